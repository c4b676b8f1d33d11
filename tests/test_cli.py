"""End-to-end tests of the installed `edgekd` console script, run as a user would run it."""
import json
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
    for cmd in ("run", "datasets", "models"):
        assert cmd in r.stdout


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    r = edgekd("run", "--epochs", "3", "--out", str(out), "--arm-check", "off")
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
    for row in rows.values():
        assert 0.1 < row["accuracy"] <= 1.0          # better than chance on 10 classes
        assert row["params"] > 0 and row["macs"] > 0 and row["bytes"] > 4 * row["params"]
        assert row["latency_ms"] > 0
    assert rows["student"]["params"] == rows["student_kd"]["params"] < rows["teacher"]["params"]
    md = (out / "report.md").read_text()
    for name in rows:
        assert f"| {name} |" in md
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "teacher" in r.stdout and "report written to" in r.stdout


def test_weights_load_safely(short_run):
    import torch
    out, _ = short_run
    sd = torch.load(out / "weights" / "teacher.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())


def test_same_seed_same_numbers(short_run, tmp_path):
    out, _ = short_run
    r = edgekd("run", "--epochs", "3", "--out", str(tmp_path / "again"), "--quiet", "--no-export")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    acc = lambda p: [row["accuracy"] for row in json.loads((p / "report.json").read_text())["rows"]]
    assert acc(out) == acc(tmp_path / "again")


@pytest.mark.parametrize("args, code, message", [
    (["run", "--dataset", "imagenet"], 2, "unknown dataset 'imagenet'; choose one of"),
    (["run", "--epochs", "0"], 2, "epochs must be > 0, got 0"),
    (["run", "--epochs", "-3"], 2, "epochs must be > 0, got -3"),
    (["run", "--temperature", "0"], 2, "temperature must be > 0, got 0.0"),
    (["run", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["run", "--dataset", "mnist", "--data-root", "{tmp}/missing"], 1, "{tmp}/missing"),
    (["run", "--out", "{tmp}/afile/run"], 2, "not writable"),
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

    monkeypatch.setattr(pl, "default_stages", lambda cfg: [("teacher", pl.stage_teacher), ("broken", broken)])
    from edgekd.cli import main
    code = main(["run", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 1
    assert list(tmp_path.iterdir()) == []


def test_deploy_rebuilds_the_bundle_from_a_run(short_run, tmp_path):
    out, _ = short_run
    r = edgekd("deploy", str(out), "--out", str(tmp_path / "bundle"))
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "bundle" / "metadata.json").read_text())
    assert meta["format"] == "edgekd-bundle" and "onnx" in meta["artifacts"]
    import numpy as np
    for key in meta["artifacts"]:   # same weights, same export: the same reference outputs as the run's own bundle
        a = np.load(tmp_path / "bundle" / meta["reference"][key])
        b = np.load(out / "bundle" / meta["reference"][key])
        assert np.abs(a - b).max() <= 1e-5, key


@pytest.mark.parametrize("cmd", ["deploy", "arm-check"])
def test_not_a_run_or_bundle_is_one_line(tmp_path, cmd):
    r = edgekd(cmd, str(tmp_path))
    assert r.returncode != 0 and r.stderr.startswith("edgekd: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert list(tmp_path.iterdir()) == []
