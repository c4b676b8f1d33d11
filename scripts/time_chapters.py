"""Time every chapter in fast mode, one at a time, and store the result for the workshop guide.

Usage: python scripts/time_chapters.py [NOTEBOOK ...]   (default: every numbered chapter)
       python scripts/time_chapters.py --headers [NOTEBOOK ...]
Writes nbs/chapter_times.json: per notebook the wall-clock seconds of `nbdev_test --path NB`
and the CPU seconds (user + system) of the processes it started, plus when and where it ran.
--headers times nothing: it rewrites the first sentence of each chapter's "**Time:**" paragraph
from nbs/chapter_times.json, so the chapters quote the numbers the workshop guide prints.
"""
import json, os, platform, re, resource, subprocess, sys, time
from pathlib import Path

root = Path(__file__).resolve().parent.parent
headers = "--headers" in sys.argv[1:]
args = [a for a in sys.argv[1:] if a != "--headers"]
nbs = [Path(a) for a in args] or [p for p in sorted((root / "nbs").glob("[0-9]*.ipynb"))
                                  if p.name != "08_workshop.ipynb"]   # the guide reads this file
bindir = Path(sys.executable).parent
out = root / "nbs" / "chapter_times.json"
old = json.loads(out.read_text()) if out.exists() else {}
cpu_model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), platform.processor())
rows = dict(old.get("chapters", {}))

def save():
    "Write what was measured so far, atomically."
    data = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "cpu": cpu_model,
            "command": "nbdev_test --path NB (one notebook at a time)", "chapters": dict(sorted(rows.items()))}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n"); os.replace(tmp, out)

# The first sentence of a "**Time:**" paragraph: up to the sentence end after "(measured ...)", or the first ")."
_FIRST = re.compile(r"\*\*Time:\*\*(?:.*?\(measured[^)]*\)[^.]*\.|.*?\)\.)", re.S)

def header_sentence(name:str, row:dict, date:str)->str:
    "The standard first sentence of a chapter's time paragraph, from its row of chapter_times.json."
    return (f"**Time:** fast mode (`nbdev_test --path nbs/{name}`, `#| slow` cells skipped) ran in {row['wall_s']:g} s "
            f"of wall-clock time and {row['cpu_s']:g} s of CPU time on a 2-core machine (load average {row['load_before']:g} "
            f"when it started; measured {date}, `nbs/chapter_times.json`, printed by the workshop guide).")

def rewrite_headers(paths):
    "Replace the first sentence of the time paragraph of each notebook in `paths` that has a row in the JSON."
    import nbformat
    for nb in paths:
        row = rows.get(nb.name)
        if row is None: print(f"{nb.name}: not timed yet, header left alone"); continue
        book = nbformat.read(nb, as_version=4)
        cell = next((c for c in book.cells if c.cell_type == "markdown" and "**Time:**" in c.source), None)
        if cell is None or not _FIRST.search(cell.source): print(f"{nb.name}: no time paragraph found"); continue
        new = _FIRST.sub(lambda m: header_sentence(nb.name, row, old.get("date", "")), cell.source, count=1)
        if new != cell.source:
            cell.source = new
            nbformat.write(book, nb)
            subprocess.run([str(bindir / "nbdev_clean"), "--fname", str(nb)], cwd=root, check=True)   # the form CI checks
            print(f"{nb.name}: header updated")

if headers:
    rewrite_headers(nbs); sys.exit(0)

for nb in nbs:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run([str(bindir / "nbdev_test"), "--path", str(nb)], cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if r.returncode != 0: sys.exit(f"{nb.name} failed in nbdev_test:\n{r.stderr[-2000:]}")
    rows[nb.name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_before": round(load, 2)}
    print(f"{nb.name:45s} {wall:7.1f} s wall {cpu:7.1f} s CPU  (load {load:.2f} before)", flush=True)
    save()
print(f"wrote {out}")
