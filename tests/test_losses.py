"""The distillation-loss benchmark in worker processes gives exactly the runs of one process."""
from edgekd.experiment import run_experiment


def test_losses_benchmark_workers_match_one_process():
    kw = dict(seeds=[0, 1], fast=True, progress=False, datasets=["digits"], methods=["kd", "born-again"])
    one = run_experiment("losses", **kw)
    two = run_experiment("losses", workers=2, **kw)
    strip = lambda runs: [{k: v for k, v in r.items() if k != "sec_per_epoch"} for r in runs]
    assert strip(one.runs) == strip(two.runs)
    assert sorted((r["seed"], r["method"]) for r in one.runs) == sorted([(0, "teacher")] + [(s, m) for s in (0, 1) for m in ("born-again", "hard", "kd")])
