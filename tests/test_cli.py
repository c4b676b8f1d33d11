"""End-to-end tests of the installed `edgekd` console script, run as a user would run it."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EDGEKD = shutil.which("edgekd") or str(Path(sys.executable).parent / "edgekd")


def edgekd(*args, cwd=None, timeout=600):
    return subprocess.run([EDGEKD, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_help_lists_subcommands():
    r = edgekd("--help")
    assert r.returncode == 0
    for cmd in ("run", "reproduce", "deploy", "arm-check", "datasets", "models", "losses"):
        assert cmd in r.stdout


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    r = edgekd("run", "--dataset", "digits", "--epochs", "5", "--out", str(out), "--arm-check", "off")
    assert r.returncode == 0, r.stderr
    return out, r


def test_run_writes_a_complete_report(short_run):
    out, r = short_run
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bundle", "report.json", "report.md", "tradeoff.png", "weights"]
    assert sorted(p.name for p in (out / "weights").iterdir()) == ["student.pt", "student_kd.pt", "teacher.pt"]
    report = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["teacher", "student", "student_kd"]
    assert report["stages"] == ["teacher", "student", "distill", "export"]
    assert report["final"]["model"] == "student_kd" == report["export"][0]["model"]
    assert report["models"] == {n: f"weights/{n}.pt" for n in rows}
    for row in rows.values():
        for split in ("valid", "test"):
            assert 0.1 < row[f"{split}_accuracy"] <= 1.0          # better than chance on 10 classes
        assert row["params"] > 0 and row["macs"] > 0 and row["bytes"] > 4 * row["params"]
        assert row["latency_ms"] > 0
    assert rows["student"]["params"] == rows["student_kd"]["params"] < rows["teacher"]["params"]
    kd = report["kd"]
    assert kd["kd_gain"] == rows["student_kd"]["test_accuracy"] - rows["student"]["test_accuracy"]
    fin = report["final"]
    assert fin["compression"] == rows["teacher"]["bytes"] / rows["student_kd"]["bytes"]
    md = (out / "report.md").read_text()
    for name in rows:
        assert f"| {name} " in md
    assert re.search(r"^\| name +\| valid_accuracy \| test_accuracy \|", md, re.M), md
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[1/4] teacher done in" in r.stdout and "[runtime latency]" in r.stdout
    summary = r.stdout.splitlines()[-4:]   # the closing summary: report, KD gain, final model, ARM verdict
    assert summary[0].strip() == f"report:      {out}/report.md (also report.json, tradeoff.png, weights/, bundle/)"
    assert summary[1].strip().startswith("KD gain:     ") and "points of test accuracy" in summary[1]
    assert summary[2].strip().startswith(f"final model: student_kd, {fin['compression']:.1f}x fewer bytes than the teacher")
    assert summary[3].strip() == "ARM check:   not run (--arm-check off)"


def _tensors(obj):
    if hasattr(obj, "shape"): return [obj]
    if isinstance(obj, dict): return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)): return [t for v in obj for t in _tensors(v)]
    return []


def test_models_load_safely_and_rebuild(short_run):
    import torch
    import edgekd.models as models
    out, _ = short_run
    report = json.loads((out / "report.json").read_text())
    teacher = report["rows"][0]
    obj = torch.load(out / "weights" / "teacher.pt", weights_only=True)
    assert sum(t.numel() for t in _tensors(obj) if t.is_floating_point()) >= teacher["params"]
    m = models.load_model(out / "weights" / "teacher.pt")   # architecture + weights: the file alone rebuilds the model
    assert sum(p.numel() for p in m.parameters()) == teacher["params"]


def test_report_rows_have_macro_f1_energy_and_latency_spread(short_run):
    import torch
    from sklearn.metrics import f1_score
    import edgekd.models as models
    from edgekd.data import get_loaders
    from edgekd.pipeline import energy_estimate
    out, _ = short_run
    report = json.loads((out / "report.json").read_text())
    dls = get_loaders("digits")
    x, y = map(torch.cat, zip(*[(b[0], b[1]) for b in dls.test]))
    for row in report["rows"]:
        m = models.load_model(out / "weights" / f"{row['name']}.pt").eval()
        with torch.no_grad(): pred = m(x).argmax(1)
        assert abs(row["test_macro_f1"] - f1_score(y.numpy(), pred.numpy(), average="macro")) < 1e-12
        assert row["energy_uj_est"] == energy_estimate(row["macs"], row["nonzero"])["total_uj"]
        assert abs(row["energy_uj_est"] - (row["macs"] * (3.7 + 0.9 + 5.0) + row["nonzero"] * 640.0) / 1e6) < 1e-9
        assert 0 < row["latency_ms"] <= row["latency_p90_ms"]
        for rt in ("ort", "litert"):   # edge runtimes, batch 1, interleaved repeats: median within its p10-p90 spread
            assert 0 < row[f"{rt}_p10_ms"] <= row[f"{rt}_ms"] <= row[f"{rt}_p90_ms"], row
            assert row[f"{rt}_bytes"] > 0
        assert row["compressed_bytes"] <= row["bytes"]
    fin, rows = report["final"], {r["name"]: r for r in report["rows"]}
    assert rows["student_kd"]["latency_from"] == "student" and rows["student_kd"]["ort_ms"] == rows["student"]["ort_ms"]
    assert fin["energy_ratio"] == rows["teacher"]["energy_uj_est"] / rows["student_kd"]["energy_uj_est"]
    md = (out / "report.md").read_text()
    assert "energy_uj_est: an ESTIMATE" in md and "Horowitz (ISSCC 2014)" in md and "Han et al. (2016)" in md
    assert re.search(r"^\| name +\| latency_ms \| latency_p90_ms \| ort_ms \| ort_p10_ms \| ort_p90_ms \| litert_ms", md, re.M), md


def test_recipe_file_picks_the_stages(tmp_path):
    (tmp_path / "r.toml").write_text('stages = [{name = "teacher"}, {name = "student"}]')
    r = edgekd("run", "--dataset", "digits", "--epochs", "1", "--recipe", str(tmp_path / "r.toml"), "--out", str(tmp_path / "run"), "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"] == ["teacher", "student"] and report["final"]["model"] == "student"


@pytest.mark.parametrize("text, message", [
    ('stages = [{name = "teacher"}, {name = "sharpen"}]', "unknown stage 'sharpen'; choose one of"),
    ('stages = [{name = "student"}, {name = "quantize", mode = "ptq"}, {name = "prune", sparsity = 0.5}]',
     "stage 'prune' cannot come after 'quantize'"),
    ('stages = [{name = "prune", amount = 0.5}]', "stage 'prune' has no option 'amount'; allowed: epochs, lr, sparsity, method"),
    ('stages = [{name = "teacher"', "not valid TOML"),
    (None, "no such file"),
])
def test_bad_recipe_is_one_line(tmp_path, text, message):
    if text is not None: (tmp_path / "r.toml").write_text(text)
    r = edgekd("run", "--recipe", str(tmp_path / "r.toml"), "--out", str(tmp_path / "run"))
    err = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in err and err.startswith("edgekd: error: "), err
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_same_seed_same_numbers(short_run, tmp_path):
    out, _ = short_run
    r = edgekd("run", "--dataset", "digits", "--epochs", "5", "--out", str(tmp_path / "again"), "--quiet", "--no-export")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    acc = lambda p: [(row["valid_accuracy"], row["test_accuracy"]) for row in json.loads((p / "report.json").read_text())["rows"]]
    assert acc(out) == acc(tmp_path / "again")


@pytest.mark.parametrize("args, code, message", [
    (["run", "--dataset", "imagenet"], 2, "unknown dataset 'imagenet'; choose one of"),
    (["run", "--epochs", "0"], 2, "epochs must be > 0, got 0"),
    (["run", "--epochs", "-3"], 2, "epochs must be > 0, got -3"),
    (["run", "--temperature", "0"], 2, "temperature must be > 0, got 0.0"),
    (["run", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["run", "--dataset", "mnist", "--data-root", "{tmp}/missing"], 1, "{tmp}/missing"),
    (["run", "--out", "{tmp}/afile/run"], 2, "not writable"),
    (["run", "--stages", "distill", "teacher"], 2, "stage 'distill' needs one of teacher before it"),
    (["run", "--stages", "teacher", "student", "prune"], 2, "stage 'prune' needs a setting: give --prune"),
    (["run", "--loss", "magic"], 2, "unknown loss 'magic'; choose one of: kd,"),
    (["run", "--prune", "0"], 2, "prune sparsity must be > 0, got 0.0"),
    (["run", "--device", "gpu"], 2, "unknown device 'gpu'; choose one of: auto, cpu, cuda"),
    (["run", "--teacher", "resnet"], 2, "unknown model 'resnet'; choose one of: cnn, dscnn, mlp"),
    (["run", "--student", "torchvision:mobilenet_v9"], 2, "unknown torchvision classification model 'mobilenet_v9'"),
    (["run", "--student", "{tmp}/nets.py:make"], 2, "no such file"),
    (["run", "--dataset", "imagefolder:{tmp}/nowhere"], 1, "does not exist; expected PATH/train/CLASS"),
])
def test_bad_input_is_one_line_and_leaves_no_output(tmp_path, args, code, message):
    (tmp_path / "afile").write_text("not a folder")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = edgekd(*args, cwd=tmp_path)
    assert r.returncode == code, (r.returncode, r.stderr)
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("edgekd: error: ")
    assert message.replace("{tmp}", str(tmp_path)) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]   # no output folder, complete or not


def test_failed_stage_leaves_no_output(tmp_path, monkeypatch):
    import edgekd.pipeline as pl

    def broken(run):
        (run.dir / "report.md").write_text("looks complete but is not")
        raise RuntimeError("stage failed")

    monkeypatch.setitem(pl.STAGES, "broken", pl.Stage("broken", broken))
    from edgekd.cli import main
    code = main(["run", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet", "--stages", "teacher", "broken"])
    assert code == 1
    assert list(tmp_path.iterdir()) == []


def test_missing_compression_chapter_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "edgekd.quant", None)     # as if the chapter were not installed
    from edgekd.cli import main
    code = main(["run", "--quantize", "ptq", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("edgekd: error: --quantize needs edgekd.quant.quantize_model, which cannot be imported here"), err
    assert list(tmp_path.iterdir()) == []


def test_prune_flag_calls_the_pruning_chapter_on_the_current_model(tmp_path, monkeypatch, capsys):
    import copy
    import types
    import torch
    calls = []

    def prune_finetune(model, dls, sparsity, method="l1-structured", teacher=None, epochs=5, lr=1e-3, seed=0):
        calls.append(dict(sparsity=sparsity, method=method, epochs=epochs, seed=seed, teacher=teacher is not None,
                          weights=[p.detach().clone() for p in model.parameters()]))
        model = copy.deepcopy(model)
        with torch.no_grad():
            for p in model.parameters(): p[p.abs() < p.abs().median()] = 0   # a stand-in for real pruning
        return model

    monkeypatch.setitem(sys.modules, "edgekd.prune", types.SimpleNamespace(prune_finetune=prune_finetune))
    from edgekd.cli import main
    out = tmp_path / "run"
    code = main(["run", "--dataset", "digits", "--epochs", "2", "--out", str(out), "--quiet", "--no-export", "--seed", "3",
                 "--prune", "0.5", "--prune-method", "l1-unstructured", "--finetune-epochs", "1"])
    assert code == 0, capsys.readouterr().err
    assert [(c["sparsity"], c["method"], c["epochs"], c["seed"], c["teacher"]) for c in calls] == [(0.5, "l1-unstructured", 1, 3, True)]
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert report["stages"] == ["teacher", "student", "distill", "prune"]
    assert report["final"]["model"] == "pruned" and rows["pruned"]["from"] == "student_kd"
    assert rows["pruned"]["nonzero"] < rows["student_kd"]["nonzero"]
    import edgekd.models as models
    kd = models.load_model(out / "weights" / "student_kd.pt")   # the prune stage started from the distilled student
    assert all(torch.equal(a, b) for a, b in zip(calls[0]["weights"], kd.parameters()))
    pruned = models.load_model(out / "weights" / "pruned.pt")
    assert sum(int((p != 0).sum()) for p in pruned.parameters()) == rows["pruned"]["nonzero"]


def test_default_dataset_distills_on_a_transfer_set_over_seeds(tmp_path):
    out = tmp_path / "run"
    r = edgekd("run", "--epochs", "1", "--transfer", "500", "--seeds", "4", "5", "--no-export", "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["config"]["dataset"], report["config"]["transfer"], report["config"]["seed"]) == ("mnist1d", 500, 4)
    sd = report["seeds"]
    assert sd["seeds"] == [4, 5] and [p["seed"] for p in sd["per_seed"]] == [4, 5]
    rows = {row["name"]: row for row in report["rows"]}
    assert sd["per_seed"][0]["kd_gain"] == rows["student_kd"]["test_accuracy"] - rows["student"]["test_accuracy"]
    gains = [p["kd_gain"] for p in sd["per_seed"]]
    assert abs(sd["kd_gain_mean"] - sum(gains) / 2) < 1e-12
    assert abs(sd["kd_gain_std"] - abs(gains[0] - gains[1]) / 2 ** 0.5) < 1e-12     # sample std of two values
    assert sorted(p.name for p in (out / "seeds" / "seed-5" / "weights").iterdir()) == ["student.pt", "student_kd.pt", "teacher.pt"]
    kd_line = next(l for l in r.stdout.splitlines() if l.strip().startswith("KD gain:"))
    assert f"{100 * sd['kd_gain_mean']:+.2f} ± {100 * sd['kd_gain_std']:.2f} points of test accuracy over 2 seeds" in kd_line, kd_line
    assert "± " in (out / "report.md").read_text()


def test_losses_command_lists_the_loss_option_choices():
    r = edgekd("losses")
    assert r.returncode == 0 and r.stdout.split()[0] == "kd" and "dkd" in r.stdout.split()


def test_deploy_rebuilds_the_bundle_from_a_run(short_run, tmp_path):
    out, _ = short_run
    r = edgekd("deploy", str(out), "--out", str(tmp_path / "bundle"))
    assert r.returncode == 0, r.stderr
    assert "bundle of student_kd written to" in r.stdout     # the run's final model, read from report.json
    meta = json.loads((tmp_path / "bundle" / "metadata.json").read_text())
    assert meta["format"] == "edgekd-bundle" and "onnx" in meta["artifacts"]
    import numpy as np
    for key in meta["artifacts"]:   # same weights, same export: the same reference outputs as the run's own bundle
        a = np.load(tmp_path / "bundle" / meta["reference"][key])
        b = np.load(out / "bundle" / meta["reference"][key])
        assert np.abs(a - b).max() <= 1e-5, key


def test_deploy_artifacts_option_picks_kinds(short_run, tmp_path):
    out, _ = short_run
    r = edgekd("deploy", str(out), "--out", str(tmp_path / "bundle"), "--artifacts", "onnx", "pte")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "bundle" / "metadata.json").read_text())
    assert sorted(meta["artifacts"]) == ["onnx", "pte"] and (tmp_path / "bundle" / meta["artifacts"]["pte"]).stat().st_size > 0
    r = edgekd("deploy", str(out), "--out", str(tmp_path / "bad"), "--artifacts", "onnx", "nosuch")
    assert r.returncode != 0 and r.stderr.startswith("edgekd: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "nosuch" in r.stderr and "pte" in r.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("cmd", ["deploy", "arm-check"])
def test_not_a_run_or_bundle_is_one_line(tmp_path, cmd):
    r = edgekd(cmd, str(tmp_path))
    assert r.returncode != 0 and r.stderr.startswith("edgekd: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert list(tmp_path.iterdir()) == []
