#!/usr/bin/env bash
# Tools to build and check the documentation site without Quarto: Debian's chromium and
# chromium-driver (the browser test) and a MathJax 3 bundle from the npm registry (math on the
# pages, served locally). Needs root for apt-get. Idempotent.
# Usage: sudo bash scripts/install_docs_tools.sh
set -euo pipefail
MATHJAX_VERSION=3.2.2
cache="${EDGEKD_CACHE:-$HOME/.cache/edgekd}/mathjax"

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq chromium chromium-driver >/dev/null
fi
echo "browser: $(chromium --version 2>/dev/null | head -1) | driver: $(chromedriver --version | head -1)"

if [ ! -s "$cache/tex-svg.js" ]; then
  command -v npm >/dev/null || { apt-get update -qq; apt-get install -y -qq npm >/dev/null; }
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack "mathjax@$MATHJAX_VERSION" --silent >/dev/null && tar xzf "mathjax-$MATHJAX_VERSION.tgz" package/es5/tex-svg.js)
  mkdir -p "$cache"
  mv "$tmp/package/es5/tex-svg.js" "$cache/tex-svg.js.part" && mv "$cache/tex-svg.js.part" "$cache/tex-svg.js"
  rm -rf "$tmp"
fi
echo "mathjax: $cache/tex-svg.js"
