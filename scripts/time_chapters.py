"""Time every chapter in fast mode, one at a time, and store the result for the workshop guide.

Usage: python scripts/time_chapters.py [NOTEBOOK ...]   (default: every numbered chapter)
Writes nbs/chapter_times.json: per notebook the wall-clock seconds of `nbdev_test --path NB`
and the CPU seconds (user + system) of the processes it started, plus when and where it ran.
"""
import json, os, platform, resource, subprocess, sys, time
from pathlib import Path

root = Path(__file__).resolve().parent.parent
nbs = [Path(a) for a in sys.argv[1:]] or [p for p in sorted((root / "nbs").glob("[0-9]*.ipynb"))
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
