#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: install, check notebooks and library are in
# sync, run every chapter (fast mode), the pytest suite and the docs pre-processing.
# Usage: bash scripts/test.sh        (creates .venv with python3.11 unless a venv is active)
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg PYTHONHASHSEED=0

step() { printf '\n==> %s\n' "$*"; }

if [ -z "${VIRTUAL_ENV:-}" ]; then
  py=$(command -v python3.11 || command -v python3)
  "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || { echo "edgekd is tested on Python 3.11; $py is $("$py" --version)"; exit 1; }
  [ -x .venv/bin/python ] || { step "create .venv"; "$py" -m venv .venv; }
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi

step "install edgekd with its test tools"
python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
python -c "import edgekd, nbdev; print('edgekd', edgekd.__version__, '| nbdev', nbdev.__version__)"

as_root() {
  if [ "$(id -u)" = 0 ]; then bash "$@"
  elif command -v sudo >/dev/null; then sudo bash "$@"
  else echo "$1 needs root: run 'sudo bash $1' once"; exit 1
  fi
}
step "ARM64 emulation tools (qemu-user >= 8.1, debootstrap) for the ARM check"
as_root scripts/install_arm_tools.sh

step "docs tools (Debian's chromium + chromium-driver, MathJax) for the docs site and its browser test"
as_root scripts/install_docs_tools.sh

step "notebooks and library are in sync (nbdev_clean + nbdev_export change nothing)"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  nbdev_clean
  nbdev_export
  dirty=$(git status --porcelain)
  if [ -n "$dirty" ]; then
    echo "nbdev_clean/nbdev_export changed or created files; run them and commit:"; echo "$dirty"; exit 1
  fi
  echo "clean"
else
  echo "not a git checkout: sync check skipped"
fi

step "run every chapter (cells flagged slow are skipped)"
nbdev_test --timing --n_workers 2

step "docs pre-processing (nbdev_proc_nbs)"
if command -v quarto >/dev/null; then
  nbdev_proc_nbs
else
  # nbdev_proc_nbs would try to install Quarto first (needs sudo and a download); the notebook
  # processing itself does not need it, so run the same command with the installer switched off.
  python -c "import nbdev.quarto as q; q._ensure_quarto = lambda: print('Quarto not installed: processing notebooks only'); q.nbdev_proc_nbs.__wrapped__()"
fi

step "docs site (scripts/build_docs.py: nbconvert + MkDocs Material) -> _site/"
python scripts/build_docs.py --mathjax "${EDGEKD_CACHE:-$HOME/.cache/edgekd}/mathjax/tex-svg.js"

step "pytest: command line, ARM check, install-level checks, docs pages in a browser"
python -m pytest -q tests

step "all checks passed"
