"""The distillation-loss benchmark in worker processes gives exactly the runs of one process."""
from edgekd.experiment import run_experiment


def test_losses_benchmark_workers_match_one_process():
    kw = dict(seeds=[0, 1], fast=True, progress=False, datasets=["digits"], methods=["kd", "born-again"])
    one = run_experiment("losses", **kw)
    two = run_experiment("losses", workers=2, **kw)
    strip = lambda runs: [{k: v for k, v in r.items() if k != "sec_per_epoch"} for r in runs]
    assert strip(one.runs) == strip(two.runs)
    assert sorted((r["seed"], r["method"]) for r in one.runs) == sorted([(0, "teacher")] + [(s, m) for s in (0, 1) for m in ("born-again", "hard", "kd")])


def test_feature_and_relation_matrices_against_references():
    "The maps drawn in chapter 11's visualisation: attention map, RKD distance potential, SP similarity matrix."
    import numpy as np
    import torch
    from edgekd.losses import attention_map, rkd_potentials, sp_similarity
    torch.manual_seed(0)
    f = torch.randn(5, 3, 4, 4)
    q = (f.double().numpy() ** 2).mean(1).reshape(5, -1)
    np.testing.assert_allclose(attention_map(f).double().numpy(), q / np.linalg.norm(q, axis=1, keepdims=True), atol=1e-6)
    e = torch.randn(6, 4)
    d = np.array([[np.linalg.norm(a - b) for b in e.numpy()] for a in e.numpy()])
    np.testing.assert_allclose(rkd_potentials(e)[0].numpy(), d / (d.sum() / 30), atol=1e-5)   # mean over the 30 pairs i != j
    g = f.flatten(1).double().numpy() @ f.flatten(1).double().numpy().T
    np.testing.assert_allclose(sp_similarity(f).double().numpy(), g / np.linalg.norm(g, axis=1, keepdims=True), atol=1e-5)


def test_dkd_beta_workers_match_one_process():
    "The DKD warm-up/beta experiment in two worker processes gives exactly the runs of one process."
    kw = dict(seeds=[0, 1], fast=True, progress=False, datasets=["digits"], betas=[1, 8])
    one = run_experiment("dkd-beta", **kw)
    two = run_experiment("dkd-beta", workers=2, **kw)
    strip = lambda runs: [{k: v for k, v in r.items() if k != "sec_per_epoch"} for r in runs]
    assert strip(one.runs) == strip(two.runs)
    assert one.summary == two.summary
    assert sorted({r["method"] for r in one.runs}) == sorted(["teacher", "hard", "kd", "dkd", "dkd+warmup b=1", "dkd+warmup b=8", "dkd b=1"])
