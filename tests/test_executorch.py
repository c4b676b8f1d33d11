"""edgekd.export.executorch: fp32 parity with PyTorch, int8 agreement with the XNNPACK PT2E quantizer, the Runtime API
(threads, chunked fixed batch) and one-line errors on bad inputs."""
import sys

import numpy as np
import pytest
import torch

import executorch  # noqa: F401  (a missing package fails the tests, it does not skip them)

from edgekd.core import ArtifactError, ConfigError, ShapeError
from edgekd.export.converters import torch_logits
from edgekd.export.executorch import ExecuTorchRuntime, export_executorch, export_executorch_int8
from edgekd.export.runtimes import MissingPackageError
from edgekd.models import get_model


@pytest.fixture(scope="module")
def cnn_pte(tmp_path_factory):
    torch.manual_seed(0); torch.set_num_threads(1)
    model = get_model("cnn", (1, 8, 8), 10).eval()
    out = tmp_path_factory.mktemp("et")
    return model, export_executorch(model, out / "model.pte", torch.zeros(4, 1, 8, 8)), out


def inputs(n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def test_fp32_parity_and_chunks(cnn_pte):
    model, pte, _ = cnn_pte
    rt = ExecuTorchRuntime(pte, threads=1)
    assert rt.batch_size == 4 and rt.input_shape == (1, 8, 8) and rt.threads == 1
    x = inputs(10)  # 10 rows on a batch-4 program: chunks 4, 4, 2 (zero-padded)
    got, ref = rt.predict(x), torch_logits(model, x)
    assert got.shape == (10, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_threads_honoured_while_no_other_program_is_open(cnn_pte):
    "ExecuTorch's pool is per process: resized to the request while no PteModel is open, else a one-line ConfigError."
    import gc
    from executorch.extension.pybindings import _C
    gc.collect()
    rt = ExecuTorchRuntime(cnn_pte[1], threads=1)
    assert rt.threads == rt.pool_threads == _C._threadpool_get_thread_count() == 1
    with pytest.raises(ConfigError, match="thread pool is shared by the whole process, has 1 threads") as e:
        ExecuTorchRuntime(cnn_pte[1], threads=2)
    assert "\n" not in str(e.value)
    del rt; gc.collect()
    rt2 = ExecuTorchRuntime(cnn_pte[1], threads=2)                 # nothing open: the pool is resized
    assert rt2.pool_threads == _C._threadpool_get_thread_count() == 2
    x = inputs(6)
    np.testing.assert_allclose(rt2.predict(x), torch_logits(cnn_pte[0], x), atol=1e-4, rtol=0)
    del rt2; gc.collect()
    assert ExecuTorchRuntime(cnn_pte[1], threads=1).pool_threads == 1
    with pytest.raises(ConfigError, match="threads"): ExecuTorchRuntime(cnn_pte[1], threads=0)


def test_int8_agreement(cnn_pte):
    model, _, out = cnn_pte
    cal = inputs(64, seed=2)
    pte8 = export_executorch_int8(model, out / "model_int8.pte", cal, torch.zeros(4, 1, 8, 8))
    x = inputs(200, seed=3)
    got, ref = ExecuTorchRuntime(pte8).predict(x), torch_logits(model, x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95  # random weights, random inputs: near-ties flip
    assert np.abs(got - ref).max() < 0.1 * (ref.max() - ref.min())
    assert pte8.stat().st_size < (out / "model.pte").stat().st_size


def test_bad_inputs(cnn_pte, tmp_path):
    model, pte, _ = cnn_pte
    rt = ExecuTorchRuntime(pte)
    cut = tmp_path / "cut.pte"; cut.write_bytes(pte.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="truncated or corrupt"): ExecuTorchRuntime(cut)
    with pytest.raises(ArtifactError, match="does not exist"): ExecuTorchRuntime(tmp_path / "none.pte")
    with pytest.raises(ShapeError, match=r"expected \(batch, 1, 8, 8\)"): rt.predict(np.zeros((2, 1, 8, 7), np.float32))
    with pytest.raises(ShapeError, match="dtype float64"): rt.predict(np.zeros((2, 1, 8, 8)))
    with pytest.raises(ConfigError, match=r"\.pte"): export_executorch(model, tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="calibration must have shape"):
        export_executorch_int8(model, tmp_path / "q.pte", np.zeros((8, 3, 8, 8), np.float32))
    try: ExecuTorchRuntime(cut)
    except ArtifactError as e: assert "\n" not in str(e)


def test_missing_package(cnn_pte, monkeypatch):
    for name in ("executorch", "executorch.extension", "executorch.extension.pybindings"):
        monkeypatch.setitem(sys.modules, name, None)   # import fails as if not installed
    with pytest.raises(MissingPackageError, match=r"model.pte needs executorch \(and the torch it depends on\): pip install executorch"):
        ExecuTorchRuntime(cnn_pte[1])
    with pytest.raises(MissingPackageError, match="ExecuTorch export needs the executorch package: pip install executorch"):
        export_executorch(cnn_pte[0], cnn_pte[2] / "x.pte")
    from edgekd.export import export_all, plan_artifacts
    assert plan_artifacts(cnn_pte[0])[0] == ["onnx", "onnx_int8", "tflite", "tflite_fp16", "tflite_int8"]  # not asked: no error
    with pytest.raises(MissingPackageError, match="pip install executorch"):
        export_all(cnn_pte[0], cnn_pte[2] / "all", artifacts=["pte"])


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_parity(arch, tmp_path):
    "Models that are not edgekd's (torchvision's, random weights, nothing downloaded, 64x64 inputs to stay quick)."
    import torchvision
    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    pte = export_executorch(m, tmp_path / f"{arch}.pte", x[:1])
    rt = ExecuTorchRuntime(pte)
    assert (rt.batch_size, rt.input_shape) == (1, (3, 64, 64))
    np.testing.assert_allclose(rt.predict(x), torch_logits(m, x.numpy()), atol=1e-4, rtol=0)   # fp32: 1e-4 of PyTorch
    cal = torch.randn(8, 3, 64, 64).numpy()
    pte8 = export_executorch_int8(m, tmp_path / f"{arch}_int8.pte", cal, x[:1])
    got = ExecuTorchRuntime(pte8).predict(x)
    assert got.shape == (2, 1000) and np.isfinite(got).all()
    assert pte8.stat().st_size < 0.5 * pte.stat().st_size                                 # int8 weights
