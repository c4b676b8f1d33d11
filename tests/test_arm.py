"""edgekd.arm: output comparison, bundle validation (edgekd.export.load_bundle, which arm_check starts with), tool
detection, and real runs on an emulated aarch64 CPU of bundles written by edgekd.export.write_bundle, including a
model exported with torch.export and a model with a replaced (factorized) layer, as the compression chapters make them.

The emulated tests need qemu-aarch64 >= 8.1 and debootstrap (`sudo bash scripts/install_arm_tools.sh`);
the first one builds the cache ($EDGEKD_ARM_CACHE or ~/.cache/edgekd/arm, a few minutes). They are never
skipped: without the tools they fail with the one-line install message, so a CI run without them fails.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgekd.arm import (ArmReport, ArmToolsError, arm_check, compare_outputs, ensure_wheels, find_tools, guest_platform,
                        manylinux_tags, run_aarch64, run_measured, wheel_requirements)
from edgekd.core import ArtifactError, ConfigError
from edgekd.export import edge_budget, load_bundle, write_bundle

# ----------------------------------------------------------------------------- a bundle written by edgekd.export

def make_bundle(folder: Path) -> Path:
    """A bundle from the deployment chapter's `write_bundle`: a small 1-D CNN as ONNX fp32 and TFLite fp32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 40, 10)).eval()
    x = torch.randn(8, 1, 40).numpy()
    data = dict(input_shape=(1, 40), classes=[str(i) for i in range(10)], sample_inputs=x)
    write_bundle(model, data, folder, name="test-cnn", artifacts=["onnx", "tflite"])
    assert not list(folder.glob("*.data")), "the ONNX file must be self-contained"
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("arm") / "bundle")


# ----------------------------------------------------------------------------- logic (no emulation)

def test_compare_outputs_pass_fail_at_tolerance():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(16, 10)).astype(np.float32)
    ok = compare_outputs(ref + 9e-5, ref, atol=1e-4)
    assert ok["passed"] and ok["argmax_agreement"] == 1.0 and 8.9e-5 < ok["max_abs_diff"] < 9.1e-5
    bad = ref.copy(); bad[3, 7] += 1.1e-4
    res = compare_outputs(bad, ref, atol=1e-4)
    assert not res["passed"] and abs(res["max_abs_diff"] - 1.1e-4) < 1e-6
    flipped = ref.copy(); flipped[0] = -flipped[0]           # row 0 now predicts another class
    assert compare_outputs(flipped, ref, atol=100)["argmax_agreement"] == pytest.approx(15 / 16)
    assert not compare_outputs(ref[:, :9], ref, atol=1)["passed"]
    nan = ref.copy(); nan[0, 0] = np.inf
    assert not compare_outputs(nan, ref, atol=1e9)["passed"]
    with pytest.raises(ConfigError, match="tolerance must be >= 0"):
        compare_outputs(ref, ref, atol=-1e-3)


def test_load_bundle_errors(bundle, tmp_path):
    assert load_bundle(bundle)["artifacts"] == {"onnx": "model.onnx", "tflite": "model.tflite"}
    cases = []
    cases.append((tmp_path / "missing", "is not an edgekd bundle: no such folder"))
    cases.append((bundle / "model.onnx", "is not an edgekd bundle: not a folder"))
    empty = tmp_path / "empty"; empty.mkdir(); cases.append((empty, "is not an edgekd bundle: no metadata.json"))
    other = tmp_path / "other"; other.mkdir(); (other / "metadata.json").write_text('{"format": "onnx"}')
    cases.append((other, "has format 'onnx', expected 'edgekd-bundle'"))
    garbage = tmp_path / "garbage"; garbage.mkdir(); (garbage / "metadata.json").write_bytes(b"\x00\xff")
    cases.append((garbage, "metadata.json is not valid JSON"))
    nopred = tmp_path / "nopred"; shutil.copytree(bundle, nopred); (nopred / "predict.py").unlink()
    cases.append((nopred, "is incomplete: missing predict.py"))
    for folder, msg in cases:
        with pytest.raises(ArtifactError, match=msg.replace("(", r"\(")) as e:
            load_bundle(folder)
        assert "\n" not in str(e.value) and repr(str(folder)) in str(e.value)
    # arm_check refuses before emulating anything
    with pytest.raises(ArtifactError, match="no metadata.json"):
        arm_check(empty)
    with pytest.raises(ConfigError, match="unknown artifact 'tflite_int8'; choose one of: onnx, tflite"):
        arm_check(bundle, artifacts=["tflite_int8"])
    noref = tmp_path / "noref"; shutil.copytree(bundle, noref); (noref / "reference_onnx.npy").unlink()
    with pytest.raises(ArtifactError, match="is incomplete: missing reference_onnx.npy"):
        arm_check(noref)
    meta = json.loads((noref / "metadata.json").read_text()); del meta["reference"]["onnx"]
    (noref / "metadata.json").write_text(json.dumps(meta))     # a complete bundle whose metadata lacks one reference
    with pytest.raises(ArtifactError, match="has no x86 reference outputs for 'onnx'"):
        arm_check(noref)


def _fake(folder: Path, name: str, text: str = "") -> None:
    p = folder / name
    p.write_text(f"#!/bin/sh\necho '{text}'\n")
    p.chmod(0o755)


def test_find_tools_messages(tmp_path):
    with pytest.raises(ArmToolsError) as e:
        find_tools(path=str(tmp_path))
    msg = str(e.value)
    assert "qemu-aarch64 >= 8.1 not found" in msg and "scripts/install_arm_tools.sh" in msg and "\n" not in msg
    _fake(tmp_path, "qemu-aarch64-static", "qemu-aarch64 version 7.2.0 (Debian 1:7.2+dfsg-7+deb12u18)")
    with pytest.raises(ArmToolsError, match=r"qemu-aarch64-static is 7\.2\.0; versions before 8\.1 crash"):
        find_tools(path=str(tmp_path))
    _fake(tmp_path, "qemu-aarch64", "qemu-aarch64 version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1)")
    assert find_tools(path=str(tmp_path), rootfs=False)["qemu_version"] == "8.2.2"
    with pytest.raises(ArmToolsError, match="debootstrap, dpkg-deb, tar not found"):
        find_tools(path=str(tmp_path))
    for n in ("debootstrap", "dpkg-deb", "tar"):
        _fake(tmp_path, n)
    assert find_tools(path=str(tmp_path))["debootstrap"] == str(tmp_path / "debootstrap")


def test_edge_budget_and_report():
    assert edge_budget(700, 10**6)["fits"] and not edge_budget(800, 10**6)["fits"]    # 1 GB board, 768 MB available
    assert edge_budget(700, 10**6)["ram_headroom_mb"] == 68
    assert not edge_budget(700, 10**6, device=dict(ram_mb=512))["fits"]
    row = dict(artifact="onnx", runtime="onnxruntime", bytes=4096, max_abs_diff=0.0, tolerance=1e-4, argmax_agreement=1.0,
               parity=True, peak_rss_mb=150.0, peak_rss_x86_mb=None, fits_device=True, passed=True, error=None)
    assert ArmReport("b", {"machine": "aarch64"}, [row]).passed
    assert not ArmReport("b", {"machine": "x86_64"}, [row]).passed


def test_run_measured_reports_peak_rss():
    big = run_measured([sys.executable, "-c", "b = b'x' * (150 * 2**20)"])
    small = run_measured([sys.executable, "-c", "pass"])
    assert big.ok and big.peak_rss_mb >= 150 > small.peak_rss_mb


def test_wheel_sets():
    assert wheel_requirements("onnxruntime", "numpy==2.0.0\nonnxruntime==1.20.0\nai-edge-litert==2.3.0") == [
        "numpy==2.0.0", "onnxruntime==1.20.0"]
    assert wheel_requirements("onnxruntime", "numpy>=2.0\n")[0] == f"numpy=={np.__version__}"   # host version when allowed
    assert wheel_requirements("onnxruntime")[1] == f"onnxruntime=={ort.__version__}"
    tags = manylinux_tags("glibc 2.36")
    assert {"manylinux2014_aarch64", "manylinux_2_27_aarch64", "manylinux_2_28_aarch64", "manylinux_2_36_aarch64"} <= set(tags)


# ----------------------------------------------------------------------------- real emulation (never skipped)

def test_tools_are_installed():
    tools = find_tools()          # raises the one-line install message when missing: the test fails, it is not skipped
    assert tuple(int(v) for v in tools["qemu_version"].split(".")[:2]) >= (8, 1)


def test_guest_is_an_aarch64_cortex_a53():
    g = guest_platform()
    assert g["machine"] == "aarch64" and g["python"].startswith("3.11") and g["libc"].startswith("glibc 2.")
    assert g["cpu_part"] == "0xd03" and g["cpu_name"] == "Cortex-A53"
    features = g["cpu_features"].split()
    assert "asimd" in features and "asimddp" not in features and "fphp" not in features


def test_emulated_process_exit_code_and_memory():
    r = run_aarch64("-c", ["import sys, platform; b = b'x' * (100 * 2**20); print(platform.machine()); sys.exit(3)"])
    assert r.returncode == 3 and r.stdout.strip() == "aarch64"
    assert r.peak_rss_mb >= 100


@pytest.fixture(scope="module")
def report(bundle):
    req = (bundle / "requirements.txt").read_text()
    for kind in ("onnxruntime", "litert"):
        ensure_wheels(kind, requirements=req)          # build the cache first (if needed): time the check alone
    return arm_check(bundle)


def test_arm_check_fp32_matches_x86(report, bundle):
    assert report.guest["machine"] == "aarch64"
    rows = {r["artifact"]: r for r in report.rows}
    assert list(rows) == ["onnx", "tflite"] and [r["runtime"] for r in rows.values()] == ["onnxruntime", "litert"]
    for key, row in rows.items():
        assert row["error"] is None and row["machine"] == "aarch64", row     # as predict.py itself saw it
        assert row["max_abs_diff"] <= 1e-4 and row["argmax_agreement"] == 1.0 and row["parity"], row
        assert row["bytes"] == (bundle / load_bundle(bundle)["artifacts"][key]).stat().st_size
        assert 20 < row["peak_rss_mb"] < 768 and row["fits_device"]
        assert row["peak_rss_x86_mb"] is not None and row["peak_rss_x86_mb"] < row["peak_rss_mb"]
    assert report.passed and "**PASSED**" in report.to_markdown()


def test_arm_check_catches_wrong_outputs_and_broken_models(bundle, tmp_path):
    shifted = tmp_path / "shifted"; shutil.copytree(bundle, shifted)
    tol = load_bundle(bundle)["tolerance"]["onnx"]
    np.save(shifted / "reference_onnx.npy", np.load(bundle / "reference_onnx.npy") + 3 * tol)
    rep = arm_check(shifted, artifacts="onnx", native=False)
    assert not rep.passed and not rep.rows[0]["parity"] and rep.rows[0]["max_abs_diff"] > tol
    broken = tmp_path / "broken"; shutil.copytree(bundle, broken)
    (broken / "model.onnx").write_bytes((bundle / "model.onnx").read_bytes()[:300])
    rep = arm_check(broken, artifacts="onnx", native=False)
    assert not rep.passed and rep.rows[0]["error"].startswith("predict.py failed: predict.py: error:"), rep.rows[0]["error"]
    assert "FAILED" in rep.to_markdown()


# ----------------------------------------------------------------------------- models the compression chapters hand over

def _low_rank(linear: nn.Linear, rank: int) -> nn.Sequential:
    """Two Linears whose product is the rank-`rank` truncated SVD of `linear` (a factorized layer)."""
    U, S, Vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    first, second = nn.Linear(linear.in_features, rank, bias=False), nn.Linear(rank, linear.out_features)
    with torch.no_grad():
        first.weight.copy_(S[:rank, None] * Vh[:rank]); second.weight.copy_(U[:, :rank]); second.bias.copy_(linear.bias)
    return nn.Sequential(first, second)


@pytest.mark.parametrize("kind", ["replaced_layer", "exported_graph", "torch_pruning"])
def test_arm_check_of_changed_and_exported_models(kind, tmp_path):
    from edgekd.models import CNN, MLP, load_model, save_model
    torch.manual_seed(0)
    model = MLP((1, 40), 10, widths=(32,)).eval()
    x = torch.randn(64, 1, 40)
    if kind == "torch_pruning":       # a zoo CNN with half of its channels removed by Torch-Pruning (DepGraph)
        from edgekd.prune import depgraph_prune
        cnn = CNN((1, 40), 10).eval()
        model = depgraph_prune(cnn, 0.5, example_input=x[:2])
        convs = lambda m: [c.out_channels for c in m.modules() if isinstance(c, nn.Conv1d)]
        assert all(p < c for p, c in zip(convs(model), convs(cnn))), (convs(model), convs(cnn))
    elif kind == "replaced_layer":      # a hidden Linear(40, 32) replaced by Linear(40, 8) -> Linear(8, 32)
        name, lin = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == 32)
        model.set_submodule(name, _low_rank(lin, 8))
    else:                              # a torch.export graph with a symbolic batch (what PT2E quantization works on)
        model = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
    path = save_model(model, tmp_path / "model.pt", example_input=x[:2])
    reloaded = load_model(path)
    assert torch.equal(reloaded(x), model(x))                     # rebuilt bit-exactly
    data = dict(input_shape=(1, 40), classes=[str(i) for i in range(10)], sample_inputs=x[:8].numpy(), calibration=x.numpy())
    bundle = write_bundle(reloaded, data, tmp_path / "bundle", artifacts=["onnx", "tflite", "onnx_int8"])
    ref = reloaded(x[:8]).detach().numpy()
    assert np.abs(np.load(bundle / "reference_onnx.npy") - ref).max() <= 1e-4
    rep = arm_check(bundle, native=False, log=None)
    assert rep.passed, rep.to_markdown()
    assert [r["artifact"] for r in rep.rows] == ["onnx", "onnx_int8", "tflite"]
    assert all(r["machine"] == "aarch64" and r["max_abs_diff"] <= r["tolerance"] for r in rep.rows)


# ----------------------------------------------------------------------------- ExecuTorch programs

def test_arm_check_of_a_bundle_with_executorch_programs(tmp_path):
    """A bundle with .pte programs goes through arm_check: each .pte row either passes, or is reported as not run with the
    runtime's own one-line error as evidence; the ONNX artifact next to them is checked as usual and the check passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 40, 10)).eval()
    x = torch.randn(64, 1, 40).numpy()
    data = dict(input_shape=(1, 40), classes=[str(i) for i in range(10)], sample_inputs=x[:8], calibration=x)
    bundle = write_bundle(model, data, tmp_path / "bundle", artifacts=["onnx", "pte", "pte_int8"])
    assert wheel_requirements("executorch")[1:3] == ["executorch==1.5.1", f"torch=={torch.__version__.split('+')[0]}"]
    rep = arm_check(bundle, native=False, log=None)
    rows = {r["artifact"]: r for r in rep.rows}
    assert list(rows) == ["onnx", "pte", "pte_int8"] and rows["onnx"]["passed"] and rows["onnx"]["ran"]
    for key in ("pte", "pte_int8"):
        r = rows[key]
        assert r["runtime"] == "executorch"
        if r["ran"]: assert r["passed"] and r["machine"] == "aarch64", r
        else: assert r["error"].startswith("cannot run under emulation: ") and "\n" not in r["error"] and key in rep.not_run, r
    assert rep.passed, rep.to_markdown()
    md = rep.to_markdown()
    assert all(f"- {k}: cannot run under emulation" in md for k in rep.not_run)


# ----------------------------------------------------------------------------- the quantization chapter's models

@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_arm_check_of_pt2e_quantized_models(mode, tmp_path):
    """A PT2E model from `quantize_model` (post-training, or QAT distilled from its float model) deploys as ONNX QDQ and
    TFLite int8, matches its PyTorch graph on x86 and passes the emulated Cortex-A53 check."""
    from edgekd.data import from_tensors
    from edgekd.learner import Learner
    from edgekd.models import get_model
    from edgekd.quant import quantize_model
    torch.manual_seed(0)
    x = torch.randn(600, 1, 20); y = (x.flatten(1) @ torch.randn(20, 3)).argmax(1)
    dls = from_tensors(x[:500], y[:500], x[500:], y[500:], batch_size=32)
    model = get_model("mlp", dls.input_shape, dls.n_classes, widths=(32,))
    Learner(model, dls, lr=3e-3, progress=False).fit(3)
    q = quantize_model(model, dls, mode=mode, teacher=model if mode == "qat" else None, epochs=1, calib_n=128)
    bundle = write_bundle(q, dls, tmp_path / "bundle", float_model=model)
    meta = json.loads((bundle / "metadata.json").read_text())
    assert sorted(meta["artifacts"]) == ["onnx_qdq", "tflite_pt2e_int8"], meta["artifacts"]
    rep = arm_check(bundle, native=False, log=None)
    assert rep.passed, rep.to_markdown()
    assert [r["artifact"] for r in rep.rows] == ["onnx_qdq", "tflite_pt2e_int8"]
    assert all(r["machine"] == "aarch64" and r["max_abs_diff"] <= r["tolerance"] for r in rep.rows)
