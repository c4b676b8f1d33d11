"""edgekd.export: the lazy package API and its import cost, the standalone predictor (bundle's predict.py),
the artifact-kinds table, and parity of exported graphs and models with replaced layers."""
import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgekd.export as ex
from edgekd.core import ConfigError
from edgekd.export import (ARTIFACTS, ArtifactKind, check_parity, export_all, load_bundle, parity_report, predictor,
                           quantize_onnx_int8, quantize_tflite, register_artifact, verify_bundle, write_bundle)
from edgekd.export.bundle import _requirements

TRAINING = {"edgekd.learner", "edgekd.kd", "edgekd.losses", "edgekd.data", "matplotlib"}


def loaded_modules(code: str) -> set:
    """Modules present in `sys.modules` after running `code` in a fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", code + "; import sys, json; print(json.dumps(sorted(sys.modules)))"],
                       capture_output=True, text=True, check=True)
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


def test_import_edgekd_export_loads_no_torch_and_no_training_stack():
    mods = loaded_modules("import edgekd.export")
    assert not ({"torch"} | TRAINING) & mods, sorted(({"torch"} | TRAINING) & mods)


def test_bundle_and_converter_names_load_no_training_stack():
    mods = loaded_modules("from edgekd.export import write_bundle, load_bundle, verify_bundle, export_onnx, load_runtime")
    assert "torch" in mods and "edgekd.export.bundle" in mods
    assert not TRAINING & mods, sorted(TRAINING & mods)


def test_lazy_api_lists_exactly_the_public_names():
    from edgekd.export import bundle, converters, runtimes
    for mod in (converters, runtimes, bundle):
        short = mod.__name__.rsplit(".", 1)[1]
        assert sorted(n for n, m in ex._API.items() if m == short) == sorted(mod.__all__)
        for name in mod.__all__:
            assert getattr(ex, name) is getattr(mod, name)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        ex.nope


def test_quantizers_take_the_same_argument_order():
    for fn in (quantize_onnx_int8, quantize_tflite):
        assert list(inspect.signature(fn).parameters)[:3] == ["model_path", "calibration", "out"]


# ----------------------------------------------------------------------------- the standalone predictor

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12, 5)).eval()
    x = torch.randn(32, 1, 12).numpy()
    data = dict(input_shape=(1, 12), classes=list("abcde"), sample_inputs=x[:6], calibration=x)
    return write_bundle(model, data, tmp_path_factory.mktemp("export") / "bundle", artifacts=["onnx", "tflite", "tflite_int8"])


def test_predict_py_is_the_predictor_module(bundle):
    assert (bundle / "predict.py").read_bytes() == Path(predictor.__file__).read_bytes()


def test_predictor_parses_as_python_3_9_and_imports_only_numpy_and_runtimes():
    src = Path(predictor.__file__).read_text()
    tree = ast.parse(src, feature_version=(3, 9))      # the oldest Python the bundle README promises
    imported = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import): imported |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom): imported.add(n.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names)
    assert third_party == {"numpy", "onnxruntime", "ai_edge_litert", "torch", "executorch"}, third_party   # torch: only for .pte


def test_predictor_lints_clean():
    from pyflakes import api as pyflakes
    from pyflakes.reporter import Reporter
    import io
    out, err = io.StringIO(), io.StringIO()
    n = pyflakes.check(Path(predictor.__file__).read_text(), "predict.py", Reporter(out, err))
    assert n == 0, out.getvalue() + err.getvalue()


def test_predict_py_runs_without_torch_or_edgekd(bundle):
    block = ("import sys; sys.modules.update(torch=None, edgekd=None); sys.argv = sys.argv[1:]; "
             "import runpy; runpy.run_path(sys.argv[0], run_name='__main__')")
    ref = np.load(bundle / "reference_tflite_int8.npy")
    out = bundle.parent / "y.npy"
    r = subprocess.run([sys.executable, "-c", block, str(bundle / "predict.py"), str(bundle / "sample_inputs.npy"),
                        "--artifact", "tflite_int8", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["predictions"] == ref.argmax(1).tolist() and res["labels"] == [list("abcde")[i] for i in res["predictions"]]
    assert np.array_equal(np.load(out), ref)            # same machine, same runtime: identical logits


@pytest.mark.parametrize("args, status, message", [
    (["missing.npy"], 2, "cannot read missing.npy as a .npy array"),
    (["sample_inputs.npy", "--threads", "0"], 2, "--threads and --repeat must be >= 1"),
    (["wrong.npy"], 2, "input has shape (2, 12), expected (batch, 1, 12)"),
])
def test_predict_py_errors_have_exit_status(bundle, args, status, message):
    np.save(bundle / "wrong.npy", np.zeros((2, 12), np.float32))
    r = subprocess.run([sys.executable, "predict.py", *args], cwd=bundle, capture_output=True, text=True)
    assert r.returncode == status and r.stderr.startswith("predict.py: error: ") and message in r.stderr, r.stderr


def test_predictor_in_process_matches_runtime(bundle):
    from edgekd.export import load_runtime
    x = np.load(bundle / "sample_inputs.npy")
    for key in ("onnx", "tflite_int8"):
        m = predictor.open_model(str(bundle / load_bundle(bundle)["artifacts"][key]))
        assert np.array_equal(predictor.predict(m, predictor.check_inputs(x, m.input_shape)),
                              load_runtime(bundle / load_bundle(bundle)["artifacts"][key]).predict(x))
    with pytest.raises(predictor.InputError, match="expected float32"):
        predictor.check_inputs(x.astype(np.float64), (1, 12))


# ----------------------------------------------------------------------------- artifact kinds as data

def test_one_entry_adds_a_kind_everywhere(bundle, tmp_path):
    def make(base, out, calibration, input_shape=None, opset=None):
        return quantize_onnx_int8(base, calibration, out, per_channel=False)
    register_artifact(ArtifactKind("onnx_int8_tensor", "model_int8_tensor.onnx", make, "onnxruntime", "ORT int8/tensor",
                                   "ONNX int8, per-tensor weights", base="onnx", exact=False,
                                   device_tolerance=("span", 0.05), calibrated=True))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
        x = torch.randn(64, 1, 12).numpy()
        data = dict(input_shape=(1, 12), classes=list("abcde"), sample_inputs=x[:6], calibration=x)
        b = write_bundle(model, data, tmp_path / "b", artifacts=["onnx_int8_tensor"])
        meta = load_bundle(b)
        assert meta["artifacts"] == {"onnx_int8_tensor": "model_int8_tensor.onnx"}        # its base was not kept
        assert meta["artifact_info"]["onnx_int8_tensor"]["runtime"] == "onnxruntime"
        ref = np.load(b / "reference_onnx_int8_tensor.npy")
        assert meta["tolerance"]["onnx_int8_tensor"] == pytest.approx(max(0.05 * float(ref.max() - ref.min()), 1e-3), abs=1e-6)
        assert [l.split("==")[0] for l in (b / "requirements.txt").read_text().split()][1:] == ["onnxruntime"]
        assert all(r["ok"] for r in verify_bundle(b))
        from edgekd.arm import _plan
        assert [p["runtime"] for p in _plan(b, meta, None)] == ["onnxruntime"]
        with pytest.raises(ConfigError, match="exists"):
            register_artifact(ARTIFACTS["onnx_int8_tensor"])
    finally:
        del ARTIFACTS["onnx_int8_tensor"]


def test_executorch_kinds_are_opt_in_and_lazy():
    "pte/pte_int8 are registered like any kind, made only by name, and the converters never import executorch themselves."
    assert [k for k, a in ARTIFACTS.items() if not a.default] == ["pte", "pte_int8"]
    assert ARTIFACTS["pte"].runtime == ARTIFACTS["pte_int8"].runtime == "executorch" and ARTIFACTS["pte_int8"].calibrated
    mods = loaded_modules("from edgekd.export import ARTIFACTS, plan_artifacts")
    assert not {m for m in mods if m.startswith("executorch") or m == "edgekd.export.executorch"}


def test_requirements_follow_the_table():
    assert [l.split("==")[0] for l in _requirements(["tflite_fp16", "onnx"]).split()[1:]] == ["ai-edge-litert", "onnxruntime"]


# ----------------------------------------------------------------------------- exported graphs, replaced layers

def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 12, generator=g)
    y = (x.flatten(1)[:, :5].argmax(1)).numpy()
    return x, y


def _trained():
    torch.manual_seed(0)
    x, y = _data()
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad(); nn.functional.cross_entropy(model(x), torch.from_numpy(y)).backward(); opt.step()
    return model.eval(), x, y


@pytest.mark.parametrize("kind", ["exported_graph", "replaced_layer"])
def test_exported_and_replaced_models_export_with_parity(kind, tmp_path):
    model, x, y = _trained()
    if kind == "exported_graph":
        model = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
    else:                                # Linear(12, 32) -> Linear(12, 6) -> Linear(6, 32): a rank-6 factorization
        lin = model[1]
        U, S, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        a, b = nn.Linear(12, 6, bias=False), nn.Linear(6, 32)
        with torch.no_grad():
            a.weight.copy_(S[:6, None] * Vh[:6]); b.weight.copy_(U[:, :6]); b.bias.copy_(lin.bias)
        model[1] = nn.Sequential(a, b)
    arts = export_all(model, tmp_path, x.numpy(), artifacts=["onnx", "tflite", "onnx_int8", "tflite_int8"], input_shape=(1, 12))
    rows = check_parity(parity_report(model, arts, x.numpy(), y))
    assert [r["artifact"] for r in rows] == ["pytorch", "onnx", "onnx_int8", "tflite", "tflite_int8"]
    assert rows[0]["accuracy"] > 0.5                # a model that learned something, so that accuracy parity means something
    assert all(r["max_abs_diff"] <= 1e-4 for r in rows if r["artifact"] in ("onnx", "tflite"))


# ----------------------------------------------------------------------------- PT2E-quantized models

def _pt2e(model, x, qat=False):
    """`model` quantized by torchao's X86 quantizer: PTQ calibrated on `x`, or QAT fine-tuned a few steps on `x`."""
    import copy
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    qz = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=qat))
    m = copy.deepcopy(model).train(qat)
    g = torch.export.export(m, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).module()
    if qat:
        g = prepare_qat_pt2e(g, qz)
        _, y = _data()
        opt = torch.optim.SGD(g.parameters(), lr=1e-3)
        for _ in range(5):
            opt.zero_grad(); nn.functional.cross_entropy(g(x), torch.from_numpy(y)).backward(); opt.step()
        move_exported_model_to_eval(g)
    else:
        g = prepare_pt2e(g, qz)
        with torch.no_grad(): g(x)
    return convert_pt2e(g)


def _agreement(a, b):
    return float((a.argmax(1) == b.argmax(1)).mean())


@pytest.fixture(scope="module")
def pt2e_bundle(tmp_path_factory):
    model, x, y = _trained()
    q = _pt2e(model, x)
    data = dict(input_shape=(1, 12), classes=list("abcde"), sample_inputs=x[:8].numpy(), sample_labels=y[:8], calibration=x.numpy())
    return model, q, x, y, write_bundle(q, data, tmp_path_factory.mktemp("pt2e") / "b", float_model=model)


def test_pt2e_ptq_bundle_has_qdq_onnx_and_litert_int8_with_parity(pt2e_bundle):
    import onnx
    from edgekd.export import litert_quantize, predict, torch_logits
    model, q, x, y = pt2e_bundle[:4]
    meta = load_bundle(pt2e_bundle[4])
    assert meta["artifacts"] == {"onnx_qdq": "model_qdq.onnx", "tflite_pt2e_int8": "model_pt2e_int8.tflite"}
    assert meta["skipped"] == {}
    assert all(r["ok"] for r in verify_bundle(pt2e_bundle[4]))
    ops = {n.op_type for n in onnx.load(str(pt2e_bundle[4] / "model_qdq.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    xn = x.numpy()
    ref_q, ref_fp = torch_logits(q, xn), torch_logits(model, xn)
    onnx_out = predict(pt2e_bundle[4] / "model_qdq.onnx", xn)
    tfl_out = predict(pt2e_bundle[4] / "model_pt2e_int8.tflite", xn)
    twin = torch_logits(litert_quantize(model, xn, (1, 12)), xn)    # the PyTorch graph the .tflite file was converted from
    assert _agreement(onnx_out, ref_q) >= 0.99
    assert _agreement(tfl_out, twin) >= 0.99
    for out in (onnx_out, tfl_out):
        assert abs(float((out.argmax(1) == y).mean()) - float((ref_fp.argmax(1) == y).mean())) <= 0.01
    check_parity(parity_report(q, {k: pt2e_bundle[4] / f for k, f in meta["artifacts"].items()}, xn, y))


def test_pt2e_bundle_without_float_model_skips_tflite_with_the_reason(pt2e_bundle, tmp_path):
    model, q, x, y = pt2e_bundle[:4]
    data = dict(input_shape=(1, 12), classes=list("abcde"), sample_inputs=x[:8].numpy(), calibration=x.numpy())
    b = write_bundle(q, data, tmp_path / "b")
    meta = load_bundle(b)
    assert list(meta["artifacts"]) == ["onnx_qdq"]
    assert "stablehlo.uniform_dequantize" in meta["skipped"]["tflite_pt2e_int8"]
    assert "Not included: `tflite_pt2e_int8`" in (b / "README.md").read_text()
    assert all(r["ok"] for r in verify_bundle(b))


def test_pt2e_qat_model_exports_with_parity(tmp_path):
    from edgekd.export import is_pt2e_quantized, predict, torch_logits
    model, x, y = _trained()
    q = _pt2e(model, x, qat=True)
    assert is_pt2e_quantized(q) and not is_pt2e_quantized(model)
    arts = export_all(q, tmp_path, x.numpy(), float_model=model)
    assert list(arts) == ["onnx_qdq", "tflite_pt2e_int8"]
    rows = check_parity(parity_report(q, arts, x.numpy(), y))
    assert [r["artifact"] for r in rows] == ["pytorch", "onnx_qdq", "tflite_pt2e_int8"]
    assert _agreement(predict(arts["onnx_qdq"], x.numpy()), torch_logits(q, x.numpy())) >= 0.99


def test_pt2e_kinds_refuse_the_wrong_model_with_the_reason(pt2e_bundle, tmp_path):
    from edgekd.export import export_tflite, export_tflite_pt2e, plan_artifacts
    model, q, x, y = pt2e_bundle[:4]
    assert plan_artifacts(model) == (["onnx", "onnx_int8", "tflite", "tflite_fp16", "tflite_int8"], {})
    assert plan_artifacts(q)[0] == ["onnx_qdq"]
    with pytest.raises(ConfigError, match="onnx_qdq needs a PT2E-quantized graph"):
        export_all(model, tmp_path, x.numpy(), artifacts=["onnx_qdq"])
    with pytest.raises(ConfigError, match="onnx is made from a float model"):
        export_all(q, tmp_path, x.numpy(), artifacts=["onnx"])
    with pytest.raises(ConfigError, match="uniform_dequantize"):
        export_tflite(q, out=tmp_path / "x.tflite")
    with pytest.raises(ConfigError, match="PT2E-quantized graph to TFLite int8"):
        export_tflite_pt2e(q, x.numpy(), tmp_path / "x.tflite")
    with pytest.raises(ConfigError, match="float_model must be the float model"):
        plan_artifacts(q, float_model=q)
    assert sorted(p.name for p in tmp_path.iterdir()) == []          # nothing half-written
