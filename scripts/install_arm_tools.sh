#!/usr/bin/env bash
# Install the tools edgekd's ARM64 check needs: qemu-user >= 8.1 (user-mode emulation of an
# aarch64 CPU) and debootstrap (downloads the arm64 Debian packages of the emulated userland).
#
#   sudo bash scripts/install_arm_tools.sh
#
# Idempotent: does nothing when suitable versions are already installed. Prints each step.
# Debian 12 (bookworm) ships qemu 7.2, which crashes onnxruntime and LiteRT at import, so on
# bookworm qemu-user comes from bookworm-backports (10.x; its binaries are static, so it needs no
# ARM libraries on the host). Debian 13+ and Ubuntu 24.04+ have a recent enough qemu in their main
# archive. binfmt_misc registration (qemu-user-binfmt) is not needed: edgekd calls qemu directly.
set -euo pipefail

QEMU_MIN=8.1
say() { printf '[install_arm_tools] %s\n' "$*"; }

qemu_ok() {   # prints the path of a qemu-aarch64 >= QEMU_MIN, if any
  local q v
  for q in qemu-aarch64-static qemu-aarch64; do
    command -v "$q" >/dev/null 2>&1 || continue
    v=$("$q" --version 2>/dev/null | sed -n 's/.*version \([0-9][0-9.]*\).*/\1/p' | head -1)
    if [ -n "$v" ] && [ "$(printf '%s\n%s\n' "$QEMU_MIN" "$v" | sort -V | head -1)" = "$QEMU_MIN" ]; then
      echo "$(command -v "$q") $v"; return 0
    fi
  done
  return 1
}
deboot_ok() { command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ]; }

if q=$(qemu_ok) && deboot_ok && command -v dpkg-deb >/dev/null 2>&1; then
  say "already installed: qemu ${q#* } (${q%% *}), debootstrap; nothing to do"
  exit 0
fi

[ "$(id -u)" = 0 ] || { say "needs root: run it as 'sudo bash $0'"; exit 1; }
command -v apt-get >/dev/null 2>&1 || {
  say "no apt-get: install qemu-user (>= $QEMU_MIN, providing qemu-aarch64) and debootstrap with your package manager"; exit 1; }

export DEBIAN_FRONTEND=noninteractive
. /etc/os-release
codename=${VERSION_CODENAME:-}
apt_opts=(-y -q --no-install-recommends)

if [ "${ID:-}" = debian ] && [ "$codename" = bookworm ] && ! qemu_ok >/dev/null; then
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    say "adding the bookworm-backports apt source (/etc/apt/sources.list.d/bookworm-backports.sources)"
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  else
    say "bookworm-backports apt source already present"
  fi
  say "apt-get update"
  apt-get update -q
  pkgs=(qemu-user)
  # an old qemu-user-static (7.2) conflicts with qemu-user 10: upgrade it from backports as well
  if dpkg -s qemu-user-static >/dev/null 2>&1; then pkgs+=(qemu-user-static); fi
  say "apt-get install -t bookworm-backports ${pkgs[*]}"
  apt-get install "${apt_opts[@]}" -t bookworm-backports "${pkgs[@]}"
else
  say "apt-get update"
  apt-get update -q
  if ! qemu_ok >/dev/null; then
    say "apt-get install qemu-user"
    apt-get install "${apt_opts[@]}" qemu-user || apt-get install "${apt_opts[@]}" qemu-user-static
  fi
fi

if ! deboot_ok || ! command -v dpkg-deb >/dev/null 2>&1; then
  say "apt-get install debootstrap"
  apt-get install "${apt_opts[@]}" debootstrap
fi
if [ ! -f /usr/share/keyrings/debian-archive-keyring.gpg ]; then
  # debootstrap checks the Debian archive's signature with this keyring (Ubuntu hosts lack it)
  say "apt-get install debian-archive-keyring"
  apt-get install "${apt_opts[@]}" debian-archive-keyring
fi

if q=$(qemu_ok); then
  say "done: qemu ${q#* } (${q%% *}), debootstrap $(dpkg-query -W -f='${Version}' debootstrap 2>/dev/null || echo '?')"
else
  say "qemu-aarch64 >= $QEMU_MIN is still missing (this distribution's qemu is too old); see https://www.qemu.org/download/"
  exit 1
fi
