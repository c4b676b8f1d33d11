"""edgekd.kd is a library module: importing it loads neither matplotlib nor the experiments. The experiments of chapter 10
live in edgekd.experiments.kd, load matplotlib only to draw, and the registry of edgekd.experiment finds them by itself."""
import subprocess
import sys


def _loaded_after(stmt:str)->list:
    "Modules of matplotlib and edgekd loaded in a fresh interpreter after running `stmt`."
    code = f"import sys\n{stmt}\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'edgekd')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])


def test_kd_loads_no_matplotlib_and_no_experiments():
    mods = _loaded_after("import edgekd.kd")
    assert "edgekd.kd" in mods
    assert [m for m in mods if m.startswith("matplotlib")] == []
    assert [m for m in mods if m.startswith("edgekd.experiment")] == []


def test_kd_experiments_load_no_matplotlib():
    mods = _loaded_after("import edgekd.experiments.kd")
    assert "edgekd.experiments.kd" in mods
    assert [m for m in mods if m.startswith("matplotlib")] == []


def test_registry_discovers_kd_experiments():
    mods = _loaded_after("from edgekd.experiment import list_experiments\n"
                         "names = set(list_experiments())\n"
                         "assert {'hinton', 'few-labels', 'omitted-class', 'temperature', 'hinton-mnist', 'teacher-ensemble', "
                         "'teacher-assistant', 'patient-consistent'} <= names, names")
    assert "edgekd.experiments.kd" in mods


def test_cli_lists_kd_experiments():
    out = subprocess.run([sys.executable, "-c", "from edgekd.cli import main; main(['reproduce', '--list'])"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("hinton", "few-labels", "omitted-class", "temperature", "hinton-mnist", "teacher-ensemble", "teacher-assistant",
                 "patient-consistent"): assert name in out.stdout


def test_fidelity_against_references():
    "fidelity: agreement is an exact fraction, KL matches torch's kl_div in the teacher || student direction."
    import torch, torch.nn.functional as F
    from edgekd.kd import fidelity
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 5, generator=g) * 3, torch.randn(7, 5, generator=g) * 3
    f = fidelity(s, t)
    assert f["agreement"] == sum(int(a == b) for a, b in zip(s.argmax(1).tolist(), t.argmax(1).tolist())) / 7
    ref = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean").item()
    assert abs(f["kl"] - ref) < 1e-6
    assert abs(f["kl"] - F.kl_div(F.log_softmax(t, -1), F.softmax(s, -1), reduction="batchmean").item()) > 1e-3


def test_ensemble_logits_average_soft_targets():
    "softmax(ensemble_logits(z, T) / T) is the mean of the teachers' softmax(z_k / T), also for very negative logits."
    import torch
    from edgekd.kd import ensemble_logits
    z = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(1)) * 50
    for T in (1.0, 3.0):
        want = torch.softmax(z / T, -1).mean(0)
        assert torch.allclose(torch.softmax(ensemble_logits(z, T) / T, -1), want, atol=1e-6)
    assert torch.isfinite(ensemble_logits(z, 1.0)).all()


def test_fast_results_are_marked():
    "A fast-mode result says so above its table and in its headline table; a full result does not."
    from edgekd.experiment import ExperimentResult, FAST_MARK
    rows = [dict(m="a", seed=0, acc=0.5)]
    from edgekd.experiment import summarize
    table = summarize(rows, ["m"], ["acc"])
    fast = ExperimentResult("x", rows, table, config=dict(fast=True)).to_markdown()
    full = ExperimentResult("x", rows, table, config=dict(fast=False)).to_markdown()
    assert FAST_MARK in fast and "(fast mode)" in fast.splitlines()[0] and "| mode |" in fast
    assert FAST_MARK not in full and "fast mode" not in full
