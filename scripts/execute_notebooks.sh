#!/usr/bin/env bash
# Regenerate the outputs stored in the notebooks (what the docs show) by executing them for
# real, slow cells included, then clean them the way CI checks. Prints one line per cell.
# Usage: bash scripts/execute_notebooks.sh [--keep-slow] [--run-slow ID[,ID...]] [NOTEBOOK ...]
#        (default: every chapter, slow cells included)
#   --keep-slow  execute every cell but the `#| slow` ones, which keep the outputs stored by their last
#                real run: for a change to prose or to fast cells only, never after the slow cells' code changed.
#   --run-slow   with --keep-slow: also execute the slow cells with these cell ids (the `id` of the cell in the
#                .ipynb JSON), e.g. the one experiment whose code or settings changed; the other slow cells keep theirs.
set -euo pipefail
keep_slow=0; run_slow=""
while [ $# -gt 0 ]; do
  case "$1" in
    --keep-slow) keep_slow=1; shift ;;
    --run-slow) [ $# -ge 2 ] || { echo "--run-slow needs a comma-separated list of cell ids" >&2; exit 2; }
                run_slow=$2; shift 2 ;;
    *) break ;;
  esac
done
if [ -n "$run_slow" ] && [ $keep_slow = 0 ]; then echo "--run-slow only makes sense with --keep-slow" >&2; exit 2; fi
cd "$(dirname "$0")/../nbs"
export EDGEKD_PROGRESS=plain MPLBACKEND=module://matplotlib_inline.backend_inline
py=${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/}
[ -n "$py" ] || { [ -x ../.venv/bin/python ] && py=../.venv/bin/; }
nbs=("$@"); [ ${#nbs[@]} -gt 0 ] || nbs=([0-9]*.ipynb)
for nb in "${nbs[@]}"; do
  nb=$(basename "$nb")
  echo "executing $nb$([ $keep_slow = 1 ] && echo ' (slow cells keep their stored outputs)')"
  start=$SECONDS
  "${py}python" - "$nb" "$keep_slow" "$run_slow" <<'PY'
import sys, time, nbformat
from nbclient import NotebookClient
path, keep_slow, run_slow = sys.argv[1], sys.argv[2] == "1", {i for i in sys.argv[3].split(",") if i}
nb = nbformat.read(path, as_version=4)
code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
unknown = run_slow - {nb.cells[i].get("id") for i in code if nb.cells[i].source.lstrip().startswith("#| slow")}
if unknown: sys.exit(f"--run-slow: no slow cell with id {', '.join(sorted(unknown))} in {path}")
slow = [i for i in code if nb.cells[i].source.lstrip().startswith("#| slow") and nb.cells[i].get("id") not in run_slow] if keep_slow else []
def directives(src):
    lines = [l.replace(" ", "") for l in src.lstrip().splitlines()]
    return {l for l in lines[:next((k for k, l in enumerate(lines) if not l.startswith("#|")), len(lines))]}
# Cells nbdev never executes (`#| eval: false`) are skipped here too, as nbdev_test skips them.
noeval = [i for i in code if "#|eval:false" in directives(nb.cells[i].source)]
kept = {i: (nb.cells[i].source, nb.cells[i].outputs) for i in slow + noeval}
for i in slow: nb.cells[i].source = "pass  # a slow cell: its stored outputs are kept"
for i in noeval: nb.cells[i].source = "pass  # not executed (eval: false)"
t = {"cell": time.time()}
def done(cell, cell_index, **_):
    now = time.time()
    first = cell.source.splitlines()[0][:60] if cell.source else ""
    print(f"  cell {cell_index:>3} ({code.index(cell_index) + 1}/{len(code)} code cells) {now - t['cell']:7.1f} s  {first}", flush=True)
    t["cell"] = now
client = NotebookClient(nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": "."}},
                        on_cell_executed=done)
client.execute()
for i, (src, outputs) in kept.items(): nb.cells[i].source, nb.cells[i].outputs = src, outputs
# Live widgets (sliders) only work in a running kernel: drop their outputs and saved state;
# the static figures next to them are what the docs show.
nb.metadata.pop("widgets", None)
for c in nb.cells:
    if c.cell_type == "code":
        c.outputs = [o for o in c.outputs if "application/vnd.jupyter.widget-view+json" not in o.get("data", {})]
nbformat.write(nb, path)
PY
  "${py}nbdev_clean" --fname "$nb"
  echo "  done in $((SECONDS - start)) s"
done
