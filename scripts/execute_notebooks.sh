#!/usr/bin/env bash
# Regenerate the outputs stored in the notebooks (what the docs show) by executing them for
# real, slow cells included, then clean them the way CI checks.
# Usage: bash scripts/execute_notebooks.sh [NOTEBOOK ...]   (default: every chapter; slow)
set -euo pipefail
cd "$(dirname "$0")/../nbs"
export EDGEKD_PROGRESS=plain MPLBACKEND=module://matplotlib_inline.backend_inline
py=${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/}
[ -n "$py" ] || { [ -x ../.venv/bin/python ] && py=../.venv/bin/; }
nbs=("$@"); [ ${#nbs[@]} -gt 0 ] || nbs=([0-9]*.ipynb)
for nb in "${nbs[@]}"; do
  nb=$(basename "$nb")
  echo "executing $nb"
  start=$SECONDS
  "${py}jupyter" nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=-1 "$nb" --log-level=WARN
  # Live widgets (sliders) only work in a running kernel: drop their outputs and saved state,
  # the static figures next to them are what the docs show.
  "${py}python" - "$nb" <<'PY'
import sys, nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
nb.metadata.pop("widgets", None)
for c in nb.cells:
    if c.cell_type == "code":
        c.outputs = [o for o in c.outputs if "application/vnd.jupyter.widget-view+json" not in o.get("data", {})]
nbformat.write(nb, sys.argv[1])
PY
  "${py}nbdev_clean" --fname "$nb"
  echo "  done in $((SECONDS - start)) s"
done
