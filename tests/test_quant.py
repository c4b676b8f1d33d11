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
