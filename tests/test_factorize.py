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
