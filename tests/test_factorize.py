"""Checks of edgekd.factorize on layers and data that chapter 40 does not use: decompositions against TensorLy,
Eckart-Young, EVBMF rank recovery, lightweight blocks against torchvision, whole-model decomposition and bad input."""
import math
import warnings

import pytest
import torch
from torch import nn

from edgekd.core import ConfigError
from edgekd import factorize as fz

import tensorly as tl
from tensorly.decomposition import parafac, partial_tucker  # noqa: E402

torch.set_num_threads(1)
tl.set_backend("pytorch")


def rel(a, b): return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape,ranks", [((48, 20, 3, 3), (12, 5)), ((7, 9, 5, 5), (3, 4)), ((16, 12, 7), (6, 6))])
def test_tucker_matches_tensorly(shape, ranks):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (core, facs), _ = partial_tucker(w, rank=list(ranks), modes=[0, 1], n_iter_max=200, tol=1e-12)
    e_tl = rel(tl.tenalg.multi_mode_dot(core, facs, modes=[0, 1]), w)
    e_hosvd = rel(fz.tucker_to_tensor(*fz.tucker(w, ranks, modes=(0, 1)), modes=(0, 1)), w)
    e_hooi = rel(fz.tucker_to_tensor(*fz.tucker(w, ranks, modes=(0, 1), n_iter=50), modes=(0, 1)), w)
    assert e_tl - 1e-9 <= e_hosvd <= math.sqrt(2) * e_tl
    assert abs(e_hooi - e_tl) < 2e-3


@pytest.mark.parametrize("shape,rank", [((20, 10, 3, 3), 8), ((6, 14, 3, 3), 10), ((16, 12, 5), 7)])
def test_cp_als_matches_tensorly(shape, rank):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e_tl = rel(tl.cp_to_tensor(parafac(w, rank, n_iter_max=150, init="svd", tol=0)), w)
    e_ours = rel(fz.cp_to_tensor(fz.cp_als(w, rank, n_iter=150, tol=0)), w)
    assert abs(e_ours - e_tl) < 0.01


@pytest.mark.parametrize("conv,xs", [(nn.Conv2d(10, 14, 5, stride=2, padding=2), (2, 10, 13, 13)),
                                     (nn.Conv2d(6, 9, (1, 3), padding=(0, 1), bias=False), (1, 6, 7, 7)),
                                     (nn.Conv1d(12, 8, 3, stride=3, dilation=2), (2, 12, 30))])
def test_full_rank_layers_equal_original(conv, xs):
    torch.manual_seed(0)
    x = torch.randn(xs)
    torch.testing.assert_close(fz.tucker_conv(conv, (conv.out_channels, conv.in_channels))(x), conv(x), atol=1e-4, rtol=1e-4)
    full = min(conv.out_channels, conv.in_channels * math.prod(conv.kernel_size))
    torch.testing.assert_close(fz.svd_conv(conv, rank=full)(x), conv(x), atol=1e-4, rtol=1e-4)
    # CP from factors of an exactly rank-3 weight
    facs = [torch.randn(d, 3, dtype=torch.float64) for d in conv.weight.shape]
    with torch.no_grad(): conv.weight.copy_(fz.cp_to_tensor(facs).float())
    torch.testing.assert_close(fz.cp_conv(conv, 3, factors=facs)(x), conv(x), atol=1e-4, rtol=1e-4)


def test_svd_linear_eckart_young():
    lin = nn.Linear(50, 33)
    s = torch.linalg.svdvals(lin.weight.double())
    for r in (1, 7, 20, 33):
        f = fz.svd_linear(lin, rank=r)
        w_r = f[1].weight.double() @ f[0].weight.double()
        assert abs(float(((w_r - lin.weight.detach().double()) ** 2).sum()) - float((s[r:] ** 2).sum())) < 1e-6
    assert fz.svd_linear(lin, energy=0.5)[0].out_features == fz.choose_rank(s, energy=0.5)


def test_evbmf_recovers_rank():
    g, hits = torch.Generator().manual_seed(123), 0
    for trial in range(10):
        L, M, r = 30 + 7 * trial, 100, 1 + trial % 5
        u = torch.linalg.qr(torch.randn(L, r, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(M, r, generator=g, dtype=torch.float64))[0]
        y = u @ torch.diag(torch.linspace(8, 4, r, dtype=torch.float64)) @ v.T + 0.15 * torch.randn(L, M, generator=g, dtype=torch.float64)
        hits += fz.evbmf(y)["rank"] == r
    print(f"EVBMF recovered the true rank in {hits} of 10 trials")
    assert hits >= 9


def test_blocks_match_torchvision():
    import torchvision as tv
    from torchvision.models.mobilenetv2 import InvertedResidual as TvIR
    torch.manual_seed(0)
    m = tv.models.mobilenet_v2(weights=None).eval()
    for blk in [b for b in m.features if isinstance(b, TvIR)][1:6]:
        convs = [c for c in blk.conv.modules() if isinstance(c, nn.Conv2d)]
        ours = fz.InvertedResidual(convs[0].in_channels, blk.out_channels, blk.stride, convs[0].out_channels / convs[0].in_channels)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in blk.parameters())
        ours.load_state_dict(dict(zip(ours.state_dict(), blk.state_dict().values())))
        x = torch.randn(1, convs[0].in_channels, 14, 14)
        with torch.no_grad(): torch.testing.assert_close(ours.eval()(x), blk(x), atol=1e-4, rtol=1e-4)
    fire = tv.models.squeezenet1_1(weights=None).features[3]
    ours = fz.Fire(64, 16, 64, 64)
    ours.load_state_dict(dict(zip(ours.state_dict(), fire.state_dict().values())))
    x = torch.randn(1, 64, 9, 9)
    with torch.no_grad(): torch.testing.assert_close(ours(x), fire(x))


def test_decompose_model_and_bad_input(tmp_path):
    from edgekd.models import CNN, load_model, save_model
    torch.manual_seed(0)
    m = CNN((1, 12, 12), 5, channels=(8, 16, 24)).eval()
    x = torch.randn(3, 1, 12, 12)
    d = fz.decompose_model(m, "cp", rank={"features.1.conv": 6, "features.2.conv": 5}, n_iter=20)
    assert [r["rank"] for r in d.decomposition] == [6, 5]
    assert type(m.features[1].conv) is nn.Conv2d
    torch.testing.assert_close(load_model(save_model(d, tmp_path / "d.pt"))(x), d(x), atol=1e-5, rtol=1e-5)
    full = fz.decompose_model(m, "tucker", rank=(24, 16), layers=["features.2.conv"])
    torch.testing.assert_close(full(x), m(x), atol=1e-4, rtol=1e-4)
    bad = [(dict(method="svd", rank=0), "must be an integer in 1..16, got 0"),
           (dict(method="tucker", rank=(25, 4), layers=["features.2.conv"]), "in 1..24, got 25"),
           (dict(method="tucker", energy=0.0), "energy must be > 0, got 0.0"),
           (dict(method="cp", energy=2), "energy must be <= 1, got 2"),
           (dict(method="cp", rank=3, layers=["head.2"]), "method 'cp' cannot decompose 'head.2' (Linear)"),
           (dict(method="svd", rank=3, layers=["features.3"]), "no layer named 'features.3' in the model"),
           (dict(method="pca", rank=3), "unknown method 'pca'")]
    for kw, msg in bad:
        with pytest.raises(ConfigError, match=None) as e: fz.decompose_model(m, **kw)
        assert msg in str(e.value), (kw, str(e.value))


def _one_line_error(fn, contains):
    with pytest.raises(ConfigError) as e: fn()
    msg = str(e.value)
    assert contains in msg, msg
    assert "\n" not in msg, f"error message spans several lines: {msg!r}"


def test_bad_inputs_are_one_line_errors():
    from edgekd.models import CNN
    torch.manual_seed(0)
    m = CNN((1, 10, 10), 4, channels=(6, 12, 20)).eval()
    lin, conv = nn.Linear(9, 7), nn.Conv2d(5, 8, 3)
    cases = [
        (lambda: fz.svd_linear(lin, rank=0), "rank for the layer must be an integer in 1..7, got 0"),
        (lambda: fz.svd_linear(lin, rank=8), "in 1..7, got 8"),
        (lambda: fz.svd_linear(lin, energy=0), "energy must be > 0, got 0"),
        (lambda: fz.svd_linear(lin, energy=1.01), "energy must be <= 1, got 1.01"),
        (lambda: fz.svd_linear(conv, rank=2), "svd decomposes nn.Linear layers; the layer is Conv2d"),
        (lambda: fz.tucker_conv(conv, (0, 2)), "output channels of the layer must be an integer in 1..8, got 0"),
        (lambda: fz.tucker_conv(conv, (2, 6)), "input channels of the layer must be an integer in 1..5, got 6"),
        (lambda: fz.tucker_conv(nn.LSTM(3, 3), (1, 1)), "tucker decomposes Conv1d and Conv2d layers; the layer is LSTM"),
        (lambda: fz.cp_conv(conv, 0), "CP rank of the layer must be an integer in 1..45, got 0"),
        (lambda: fz.cp_conv(conv, 46), "in 1..45, got 46"),
        (lambda: fz.decompose_model(m, "cp", rank=0), "CP rank of 'features.1.conv' must be an integer in 1..54, got 0"),
        (lambda: fz.decompose_model(m, "tucker", rank=(13, 2), layers=["features.1.conv"]), "in 1..12, got 13"),
        (lambda: fz.decompose_model(m, "svd", energy=-0.1), "energy must be > 0, got -0.1"),
        (lambda: fz.decompose_model(m, "tucker", rank="energy", energy=3), "energy must be <= 1, got 3"),
        (lambda: fz.decompose_model(m, "cp", rank=2, layers=["features.0.bn"]), "method 'cp' cannot decompose 'features.0.bn' (BatchNorm2d)"),
        (lambda: fz.decompose_model(m, "svd", rank=2, layers=["head.7"]), "no layer named 'head.7' in the model"),
        (lambda: fz.lowrank_finetune(m, None, rank="energy", energy=0.0), "energy must be > 0, got 0.0"),
    ]
    for fn, msg in cases: _one_line_error(fn, msg)


def test_count_macs_matches_flop_counter_on_factorized_models_and_blocks():
    from torch.utils.flop_counter import FlopCounterMode
    from edgekd.models import CNN
    from edgekd.profile import count_macs
    def flop_macs(model, shape):
        with FlopCounterMode(display=False) as fc, torch.no_grad(): model.eval()(torch.zeros(1, *shape))
        return fc.get_total_flops() // 2
    torch.manual_seed(0)
    m = CNN((1, 14, 14), 5, channels=(8, 16, 24)).eval()
    models = [m, fz.decompose_model(m, "tucker", energy=0.6), fz.decompose_model(m, "cp", rank=5, n_iter=5), fz.decompose_model(m, "auto", rank="vbmf"),
              fz.LightNet((1, 14, 14), 5, [("fire", 16, 2), ("shuffle", 24, 2), ("ir", 24, 1), ("ds", 32, 1)])]
    for model in models: assert count_macs(model, (1, 14, 14)) == flop_macs(model, (1, 14, 14))
    # a Tucker layer by hand: 1x1 (c_in -> r_in), k x k core (r_in -> r_out), 1x1 (r_out -> c_out) per output position
    t = fz.tucker_conv(nn.Conv2d(16, 24, 3, padding=1), (6, 4))
    assert count_macs(t, (16, 9, 9)) == 81 * (16 * 4 + 4 * 6 * 9 + 6 * 24)


def test_compare_speed_and_layer_times():
    from edgekd.models import CNN
    from edgekd.profile import count_macs
    torch.manual_seed(0)
    m = CNN((1, 12, 12), 4, channels=(8, 16)).eval()
    d = fz.decompose_model(m, "cp", rank=4, n_iter=5)
    r = fz.compare_speed({"a": m, "b": d}, (1, 12, 12), rounds=2, runs=3, warmup=1, onnx=False)
    assert set(r) == {"a", "b"} and r["b"]["macs"] == count_macs(d, (1, 12, 12))
    for v in r.values(): assert v["eager_min"] <= v["eager_p10"] <= v["eager_ms"] <= v["eager_p90"]
    rows = fz.layer_times(d, (1, 12, 12), rounds=1, runs=2)
    assert sum(x["macs"] for x in rows) == count_macs(d, (1, 12, 12))     # only convs and linears do MACs here
    assert [x["kind"] for x in rows] == ["dense", "pointwise", "depthwise", "depthwise", "pointwise", "linear"]
    dw = next(x for x in rows if x["kind"] == "depthwise")                # (3, 1) depthwise on 4 channels at 6x6
    assert dw["bytes"] == 4 * (4 * 6 * 6 * 2 + 4 * 3) and dw["macs"] == 4 * 6 * 6 * 3
    with pytest.raises(ConfigError, match="compare_speed needs at least one model"): fz.compare_speed({}, (1, 12, 12))


def test_mutate_and_search_respect_budget():
    import numpy as np
    from edgekd.data import get_loaders
    from edgekd.models import CNN
    from edgekd.profile import count_macs
    rng = np.random.default_rng(5)
    a = fz.sample_arch(rng)
    for _ in range(30):
        b = fz.mutate_arch(a, rng)
        assert b != a and 2 <= len(b) <= 4 and [w for _, w, _ in b] == sorted(w for _, w, _ in b)
        assert [s for *_, s in b] == [2, 2, 1, 1][:len(b)]
        a = b
    dls = get_loaders("digits", batch_size=128, seed=1)
    teacher = CNN(dls.input_shape, 10, channels=(8, 8)).eval()
    rows = fz.search_arch(dls, teacher, max_macs=60_000, strategy="evolution", n_candidates=3, population=2, epochs=1, seed=3, widths=(16, 24))
    assert len(rows) == 3 and len({str(r["blocks"]) for r in rows}) == 3
    assert all(r["macs"] == count_macs(r["model"], dls.input_shape) <= 60_000 for r in rows)
    assert [r["valid_accuracy"] for r in rows] == sorted((r["valid_accuracy"] for r in rows), reverse=True)
    slow = fz.search_arch(dls, teacher, max_ms=1e3, strategy="random", n_candidates=1, epochs=1, seed=0, widths=(16,))
    assert slow[0]["ms"] is not None and slow[0]["ms"] <= 1e3
    with pytest.raises(ConfigError, match="give a budget"): fz.search_arch(dls, teacher)
