"""Checks of edgekd.quant on data the chapter does not use: bit-exactness with PyTorch's quantization ops,
unbiased stochastic rounding, the straight-through gradient, integer-only layers against ONNX Runtime, PT2E entry point."""
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from fastcore.test import test_close as close, test_eq as eq, test_fail as fails
from torch import nn

from edgekd.core import ConfigError, ShapeError
from edgekd.quant import (IntegerLayer, calc_qparams, calibration_tensor, choose_qparams, dequantize, estimate_range,
                          fake_quant_model, fake_quantize, fold_batchnorm, qrange, quantize, quantize_multiplier,
                          requantize, stochastic_round)

warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*")
torch.set_num_threads(1)


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("bits", [8, 6, 4, 3, 2])
def test_fake_quant_per_tensor_bit_exact(seed, bits):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 17, 29, generator=g) * float(torch.rand(1, generator=g) * 10 + 0.1)
    lo, hi = qrange(bits)
    for _ in range(4):
        scale = float(torch.rand(1, generator=g) * 0.2 + 1e-3)
        zp = int(torch.randint(lo, hi + 1, (1,), generator=g))
        eq(fake_quantize(x, scale, zp, bits), torch.fake_quantize_per_tensor_affine(x, scale, zp, lo, hi))
        ulo, uhi = qrange(bits, signed=False)
        uzp = int(torch.randint(ulo, uhi + 1, (1,), generator=g))
        eq(dequantize(quantize(x, scale, uzp, bits, signed=False), scale, uzp),
                torch.fake_quantize_per_tensor_affine(x, scale, uzp, ulo, uhi))


@pytest.mark.parametrize("seed", [21, 22])
def test_int_repr_bit_exact(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(100_003, generator=g) * 7
    for scale, zp in [(0.0123, -3), (0.31, 17), (0.0777, 0)]:
        eq(quantize(x, scale, zp), torch.quantize_per_tensor(x, scale, zp, torch.qint8).int_repr().int())
        eq(quantize(x, scale, zp + 128, signed=False), torch.quantize_per_tensor(x, scale, zp + 128, torch.quint8).int_repr().int())


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_fake_quant_per_channel_bit_exact(axis):
    g = torch.Generator().manual_seed(31 + axis)
    w = torch.randn(7, 5, 9, generator=g) * 2
    n = w.shape[axis]
    for bits in (8, 4):
        lo, hi = qrange(bits)
        sc = torch.rand(n, generator=g) * 0.1 + 0.002
        zc = torch.randint(lo, hi + 1, (n,), generator=g)
        eq(fake_quantize(w, sc, zc, bits, axis=axis),
                torch.fake_quantize_per_channel_affine(w, sc, zc.int(), axis % 3, lo, hi))


def test_ste_gradient_matches_torch():
    g = torch.Generator().manual_seed(41)
    x = (torch.randn(2000, generator=g) * 3).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    up = torch.randn(2000, generator=g)
    fake_quantize(x, 0.02, 5, 6).backward(up)
    torch.fake_quantize_per_tensor_affine(xr, 0.02, 5, -32, 31).backward(up)
    eq(x.grad, xr.grad)
    assert 0 < int((x.grad == 0).sum()) < 2000   # some values clipped, some not


def test_stochastic_rounding_unbiased():
    vals = torch.tensor([-3.7, -0.5, 0.01, 0.99, 12.25])
    n = 100_000
    draws = stochastic_round(vals.expand(n, -1).contiguous(), torch.Generator().manual_seed(51))
    close(draws.mean(0), vals, eps=5 * 0.5 / n**0.5)
    assert ((draws == vals.floor()) | (draws == vals.ceil())).all()
    whole = torch.tensor([2.0, -4.0])
    eq(stochastic_round(whole), whole)   # whole numbers never move


def test_calc_qparams_matches_observers():
    from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver
    eps = torch.finfo(torch.float32).eps
    t = torch.randn(12, 40, generator=torch.Generator().manual_seed(61)) * 3 - 1
    for qscheme, sym in ((torch.per_tensor_affine, False), (torch.per_tensor_symmetric, True)):
        for dtype, signed in ((torch.qint8, True), (torch.quint8, False)):
            obs = MinMaxObserver(dtype=dtype, qscheme=qscheme, eps=eps); obs(t)
            s, z = obs.calculate_qparams()
            s2, z2 = calc_qparams(t.min(), t.max(), symmetric=sym, signed=signed)
            eq(s2, s.reshape(())); eq(z2, z.reshape(()).int())
    for qscheme, sym in ((torch.per_channel_affine, False), (torch.per_channel_symmetric, True)):
        obs = PerChannelMinMaxObserver(ch_axis=1, dtype=torch.qint8, qscheme=qscheme, eps=eps); obs(t)
        s, z = obs.calculate_qparams()
        s2, z2 = calc_qparams(t.min(0).values, t.max(0).values, symmetric=sym)
        eq(s2, s); eq(z2, z.int())


def test_range_estimators():
    g = torch.Generator().manual_seed(71)
    x = torch.randn(6, 1000, generator=g)
    x[:, 0] = 50.0   # one outlier per row
    lo, hi = estimate_range(x, "percentile", axis=0, percentile=99)
    close(hi, torch.quantile(x, 0.99, dim=1)); assert (hi < 50).all()
    s_mse, _ = choose_qparams(x, 4, method="mse", axis=0)
    s_mm, _ = choose_qparams(x, 4, axis=0)
    e = lambda s, z: ((fake_quantize(x, s, z, 4, axis=0) - x) ** 2).mean()
    assert e(*choose_qparams(x, 4, method="mse", axis=0)) < e(*choose_qparams(x, 4, axis=0))
    assert (s_mse < s_mm).all()


def test_bad_inputs():
    x = torch.randn(4, 5)
    fails(lambda: qrange(1), contains="bits must be >= 2, got 1")
    fails(lambda: qrange(33), contains="bits must be <= 16, got 33")
    fails(lambda: quantize(x, 0.1, 0, bits=0), contains="bits must be >= 2")
    fails(lambda: quantize(x, torch.ones(5), 0, axis=2), contains="axis 2 is out of range for a tensor of shape (4, 5)")
    fails(lambda: choose_qparams(x, axis=-3), contains="axis -3 is out of range")
    fails(lambda: estimate_range(torch.tensor([]), "minmax"), contains="x is empty")
    fails(lambda: estimate_range(torch.tensor([0.0, float("inf")])), contains="1 NaN or Inf")
    fails(lambda: estimate_range(torch.tensor([float("nan")])), contains="1 NaN or Inf")
    fails(lambda: quantize(x, -1.0, 0), contains="scale must be finite and > 0")
    try: quantize(x, torch.ones(5), 0, axis=5)
    except ShapeError: pass
    else: raise AssertionError("an axis out of range must raise ShapeError")
    try: qrange(1)
    except ConfigError: pass


def test_requantize_against_exact():
    acc = torch.randint(-2**20, 2**20, (3000,), generator=torch.Generator().manual_seed(81))
    for m in (0.00071, 0.0456, 0.61):
        m0, n = quantize_multiplier(m)
        got = requantize(acc, m0, n, bits=16)
        exact = torch.tensor([(Fraction(int(a) * m0, 2**(31 + n)) + Fraction(1, 2)).__floor__() for a in acc]).clamp(*qrange(16))
        assert int((got - exact).abs().max()) <= 1


def _ort_conv(lq, xq):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    a = lq.conv_args
    i8 = lambda name, v: numpy_helper.from_array(np.asarray(v, dtype=np.int8), name)
    f32 = lambda name, v: numpy_helper.from_array(np.asarray(v, dtype=np.float32), name)
    inits = [f32("xs", lq.x_scale), i8("xz", lq.x_zp), f32("ys", lq.y_scale), i8("yz", lq.y_zp), i8("w", lq.wq.numpy()),
             f32("ws", lq.w_scale.numpy()), i8("wz", np.zeros(len(lq.wq))), numpy_helper.from_array(lq.bq.numpy().astype(np.int32), "b")]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"], strides=list(a["stride"]),
                            pads=[a["padding"][0], a["padding"][1]] * 2, dilations=list(a["dilation"]))
    out = list(lq(xq).shape)
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.INT8, list(xq.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.INT8, out)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]); onnx.checker.check_model(model)
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"x": xq.numpy().astype(np.int8)})[0].astype(np.int32))


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_integer_conv_matches_onnxruntime(stride, padding, dilation):
    torch.manual_seed(91)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(5, 4, 12, 10) * 2 + 0.3
    with torch.no_grad(): y = conv(x)
    lq = IntegerLayer(conv, *choose_qparams(x), *choose_qparams(y))
    xq = quantize(x, lq.x_scale, lq.x_zp)
    ours, theirs = lq(xq), _ort_conv(lq, xq)
    d = (ours - theirs).abs()
    assert int(d.max()) <= 1 and float((d == 0).float().mean()) > 0.99
    err = (dequantize(ours, lq.y_scale, lq.y_zp) - y).abs().max() / lq.y_scale
    assert float(err) < 4   # a few output steps of the float layer (input and weight rounding)


def test_integer_linear_close_to_float():
    torch.manual_seed(92)
    lin = nn.Linear(30, 12)
    x = torch.rand(40, 30) * 4 - 1
    with torch.no_grad(): y = lin(x).relu()
    lq = IntegerLayer(lin, *choose_qparams(x), *choose_qparams(y), relu=True)
    out = lq(quantize(x, lq.x_scale, lq.x_zp))
    assert int(out.min()) >= lq.y_zp    # the fused ReLU
    assert float(((dequantize(out, lq.y_scale, lq.y_zp) - y).abs().max()) / lq.y_scale) < 4
    fails(lambda: IntegerLayer(nn.Conv1d(2, 2, 3), 0.1, 0, 0.1, 0), contains="supports nn.Linear and nn.Conv2d")


def _tiny_dls():
    from edgekd.data import from_tensors
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 1, 6, 6, generator=g); y = (x.mean((1, 2, 3)) > 0).long()
    return from_tensors(x[:160], y[:160], x[160:], y[160:], batch_size=32)


def test_fold_batchnorm_and_fake_quant_model():
    from edgekd.models import CNN
    torch.manual_seed(0)
    m = CNN((1, 6, 6), 2, channels=(4, 8)).eval()
    for bn in (l for l in m.modules() if isinstance(l, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(0.5, 2)
    x = torch.randn(10, 1, 6, 6)
    with torch.no_grad(): close(fold_batchnorm(m)(x), m(x), eps=1e-4)
    q = fake_quant_model(m, 3, None, per_channel=True)
    for l in q.modules():
        if isinstance(l, nn.Conv2d): assert max(len(l.weight[c].unique()) for c in range(len(l.weight))) <= 8
    fails(lambda: fake_quant_model(m, None, 8, calib_x=torch.full((4, 1, 6, 6), float("nan"))), contains="calibration data holds")


def test_quantize_model_ptq_and_qat():
    from edgekd.models import MLP
    from edgekd.core import is_exported
    dls = _tiny_dls()
    torch.manual_seed(0)
    model = MLP((1, 6, 6), 2, widths=(16,)).eval()
    for mode, kw in (("ptq", {}), ("qat", dict(epochs=1, teacher=model))):
        q = quantize_model_(model, dls, mode, **kw)
        assert is_exported(q)
        with torch.no_grad(): out = q(torch.randn(3, 1, 6, 6))
        eq(out.shape, (3, 2))
        eq(q.input_shape, (1, 6, 6))
    fails(lambda: quantize_model_(model, dls, "fp8"), contains="unknown mode 'fp8'")


def quantize_model_(*a, **kw):
    from edgekd.quant import quantize_model
    return quantize_model(*a, **kw)


def test_calibration_tensor_checks():
    dls = _tiny_dls()
    c = calibration_tensor(dls, 50, seed=1)
    eq(c.shape, (50, 1, 6, 6))
    eq(calibration_tensor(dls, 50, seed=1), c)   # seeded
    fails(lambda: calibration_tensor(dls, 0), contains="n must be >= 1")


# --- mixed precision, unsupported ops, ONNX Runtime / TFLite variants, timing helpers ---
import itertools
from pathlib import Path

from edgekd.quant import (bit_allocations, choose_bits, float_weight_ops, latency_stats, ort_op_times, ort_quantize,
                          quantize_model, tflite_dynamic_range, time_interleaved, weighted_layers)


def _brute_force(sens):
    layers = list(dict.fromkeys(r["layer"] for r in sens))
    return [(sum(r["params"] * r["bits"] for r in c) / 8, sum(max(r["drop"], 0) for r in c))
            for c in itertools.product(*[[r for r in sens if r["layer"] == n] for n in layers])]


@pytest.mark.parametrize("seed", [61, 62, 63])
def test_bit_allocation_is_the_exact_knapsack(seed):
    rng = np.random.default_rng(seed)
    sens = [dict(layer=f"layer{i}", bits=b, params=int(p), drop=float(rng.normal(0.02, 0.05) * 8 / b))
            for i, p in enumerate(rng.integers(10, 3000, 5)) for b in (8, 5, 3, 2)]
    allocs = _brute_force(sens)
    front = bit_allocations(sens)
    pareto = sorted({a for a in allocs if not any((o[0] <= a[0] and o[1] < a[1] - 1e-12) or (o[0] < a[0] and o[1] <= a[1] + 1e-12) for o in allocs)})
    close(np.array([(f["bytes"], f["cost"]) for f in front]), np.array(pareto), eps=1e-9)
    for budget in np.linspace(min(a[0] for a in allocs), max(a[0] for a in allocs), 9):
        got = choose_bits(sens, budget)
        b = sum(r["params"] * r["bits"] for r in sens if got[r["layer"]] == r["bits"]) / 8
        c = sum(max(r["drop"], 0) for r in sens if got[r["layer"]] == r["bits"])
        assert b <= budget + 1e-9
        close(c, min(a[1] for a in allocs if a[0] <= budget + 1e-9), eps=1e-9)
    fails(lambda: choose_bits(sens, 1), contains="is below the smallest allocation")


def test_fake_quant_model_per_layer_bits():
    torch.manual_seed(71)
    m = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4))
    q = fake_quant_model(m, {"2": 3})
    eq(torch.equal(q[0].weight, m[0].weight), True)                       # unnamed layer: float
    s, z = choose_qparams(m[2].weight.detach(), 3, symmetric=True, axis=0)
    eq(torch.equal(q[2].weight.detach(), fake_quantize(m[2].weight.detach(), s, z, 3, axis=0)), True)   # named layer: its own grid
    eq(list(weighted_layers(m)), ["0", "2"])
    fails(lambda: fake_quant_model(m, {"1": 4}), contains="unknown layer '1' in w_bits; the weighted layers are: 0, 2")
    fails(lambda: fake_quant_model(m, {"0": 17}), contains="bits must be <= 16, got 17")


class _Bilinear(nn.Module):
    "A Linear, then a Bilinear layer (no PT2E quantizer annotates aten.bilinear)."
    def __init__(self):
        super().__init__(); self.fc, self.pair = nn.Linear(16, 6), nn.Bilinear(6, 6, 10)
        self.input_shape, self.n_classes = (1, 4, 4), 10
    def forward(self, x):
        h = self.fc(x.flatten(1)).relu()
        return self.pair(h, h)


def _tiny_dls4(seed=81, shape=(1, 4, 4)):
    from edgekd.data import from_tensors
    g = torch.Generator().manual_seed(seed)
    return from_tensors(torch.randn(96, *shape, generator=g), torch.randint(0, 10, (96,), generator=g),
                        torch.randn(16, *shape, generator=g), torch.randint(0, 10, (16,), generator=g), batch_size=16)


@pytest.mark.parametrize("backend", ["x86", "arm"])
def test_unsupported_op_is_named_with_its_layer(backend):
    dls = _tiny_dls4()
    with pytest.raises(ConfigError) as e: quantize_model(_Bilinear(), dls, "ptq", backend=backend, calib_n=32)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert f"the {backend} PT2E quantizer cannot handle aten.bilinear in layer 'pair' (Bilinear)" in msg and "allow_float=True" in msg
    q = quantize_model(_Bilinear(), dls, "ptq", backend=backend, calib_n=32, allow_float=True)
    eq(float_weight_ops(q), ["aten.bilinear in layer 'pair' (Bilinear)"])
    eq(float_weight_ops(quantize_model(nn.Sequential(nn.Flatten(), nn.Linear(16, 10)), dls, "ptq", backend=backend, calib_n=32)), [])


def _onnx_mlp(tmp_path):
    from edgekd.export import export_onnx
    from edgekd.models import MLP
    torch.manual_seed(91)
    m = MLP((1, 4, 4), 10, widths=(32,)).eval()
    return m, export_onnx(m, out=tmp_path/"fp32.onnx")


def test_ort_quantize_configurations(tmp_path):
    import onnx
    from onnx import TensorProto, numpy_helper
    from edgekd.export import predict
    m, fp = _onnx_mlp(tmp_path)
    x = torch.randn(200, 1, 4, 4, generator=torch.Generator().manual_seed(92))
    ref = predict(fp, x.numpy()).argmax(1)
    for fmt, act, rr in [("qdq", "u8", True), ("qdq", "s8", False), ("qoperator", "u8", False), ("qoperator", "s8", False)]:
        p = ort_quantize(fp, x[:100], tmp_path/f"{fmt}_{act}_{rr}.onnx", format=fmt, activations=act, reduce_range=rr)
        g = onnx.load(str(p)).graph
        ops = {n.op_type for n in g.node}
        eq("QuantizeLinear" in ops, True)
        eq(bool(ops & {"QLinearMatMul", "QGemm", "MatMulInteger"}), fmt == "qoperator")
        w = [numpy_helper.to_array(t) for t in g.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
        assert w and max(int(np.abs(a).max()) for a in w) <= (64 if rr else 127)
        acts = [t for t in g.initializer if t.name.endswith("zero_point") and t.data_type in (TensorProto.UINT8, TensorProto.INT8)]
        assert any(t.data_type == (TensorProto.UINT8 if act == "u8" else TensorProto.INT8) for t in acts)
        assert (predict(p, x.numpy()).argmax(1) == ref).mean() >= 0.9
    bad = x[:10].clone(); bad[3, 0, 0, 0] = float("nan")
    fails(lambda: ort_quantize(fp, bad, tmp_path/"bad.onnx"), contains="calibration data holds 1 NaN or Inf")
    fails(lambda: ort_quantize(fp, x[:0], tmp_path/"bad.onnx"), contains="calibration data is empty")
    fails(lambda: ort_quantize(fp, x, tmp_path/"bad.onnx", activations="s16"), contains="unknown activations 's16'")
    assert not (tmp_path/"bad.onnx").exists()


def test_tflite_dynamic_range(tmp_path):
    from ai_edge_litert.interpreter import Interpreter
    from edgekd.export import export_tflite, predict
    from edgekd.models import MLP
    torch.manual_seed(93)
    m = MLP((1, 4, 4), 10, widths=(64,)).eval()
    fp = export_tflite(m, out=tmp_path/"fp32.tflite")
    dyn = tflite_dynamic_range(fp, tmp_path/"dyn.tflite")
    it = Interpreter(model_path=str(dyn)); it.allocate_tensors()
    assert sum(d["dtype"] == np.int8 for d in it.get_tensor_details()) >= 2
    eq(it.get_input_details()[0]["dtype"], np.float32)
    x = np.random.default_rng(94).standard_normal((64, 1, 4, 4)).astype(np.float32)
    assert (predict(dyn, x).argmax(1) == predict(fp, x).argmax(1)).mean() >= 0.95
    assert dyn.stat().st_size < fp.stat().st_size
    (tmp_path/"junk.tflite").write_bytes(b"\x00" * 64)
    fails(lambda: tflite_dynamic_range(tmp_path/"junk.tflite", tmp_path/"out.tflite"), contains="AI Edge Quantizer could not quantize junk.tflite")
    assert not (tmp_path/"out.tflite").exists()


def test_timing_helpers_and_profiler(tmp_path):
    import time
    calls = []
    t = time_interleaved({"fast": lambda: calls.append("f"), "slow": lambda: (calls.append("s"), time.sleep(0.001))}, rounds=15, warmup=2)
    eq([sorted(calls[4 + 2 * i:6 + 2 * i]) for i in range(15)], [["f", "s"]] * 15)
    assert t["slow"].min() >= 1000 and len(t["fast"]) == 15
    a = np.array([9.0, 1.0, 4.0, 16.0])
    eq(latency_stats(a), dict(median_us=6.5, p10_us=float(np.percentile(a, 10)), p90_us=float(np.percentile(a, 90)), min_us=1.0, n=4))
    _, fp = _onnx_mlp(tmp_path)
    import onnx
    prof = ort_op_times(fp, np.zeros((1, 1, 4, 4), np.float32), runs=20)
    close(sum(r["share"] for r in prof), 1.0, eps=1e-9)
    assert {r["op"] for r in prof} <= {n.op_type for n in onnx.load(str(fp)).graph.node} | {"FusedGemm", "FusedMatMul", "MatMul", "Gemm"}
    assert all(r["us_per_run"] > 0 and r["calls"] >= 1 for r in prof)
