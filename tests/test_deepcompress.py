"""Deep Compression (edgekd.deepcompress): values checked against autograd, scikit-learn and entropy bounds, on tensors not in the chapter."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekd.core import ArtifactError, ConfigError, ShapeError
from edgekd.data import from_tensors
from edgekd.deepcompress import (CentroidCB, absolute_index, canonical_codes, centroid_grad, compression_table, decode_layer,
                                 decode_model, deep_compress, encode_layer, encode_model, huffman_decode, huffman_encode, huffman_lengths,
                                 kmeans_share, linear_centroids, relative_index, share_weights, shared_weight)
from edgekd.learner import Learner
from edgekd.prune import magnitude_mask

torch.set_num_threads(1)


def _shared(shape, sparsity, bits, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    c, codes = kmeans_share(w, magnitude_mask(w, sparsity), bits)
    return shared_weight(c, codes), c, codes


def test_centroid_grad_matches_autograd_on_conv():
    g = torch.Generator().manual_seed(7)
    conv = nn.Conv2d(3, 4, 3)
    w = conv.weight.detach()
    c, codes = kmeans_share(w, magnitude_mask(w, 0.5), bits=3)
    cc = c.clone().requires_grad_()
    W = shared_weight(cc, codes); W.retain_grad()
    x = torch.randn(2, 3, 6, 6, generator=g)
    (F.conv2d(x, W, conv.bias.detach()) ** 2).mean().backward()
    torch.testing.assert_close(centroid_grad(W.grad, codes, len(c)), cc.grad, rtol=1e-5, atol=1e-7)


def test_kmeans_matches_sklearn_lloyd_from_linear_init():
    from sklearn.cluster import KMeans
    g = torch.Generator().manual_seed(11)
    w = torch.cat([torch.randn(300, generator=g) * 0.1, torch.randn(50, generator=g) + 2])
    mask = magnitude_mask(w, 0.3)
    c, codes = kmeans_share(w, mask, bits=3, iters=300)
    v = w[mask].double().numpy()[:, None]
    init = linear_centroids(w, mask, 8).double().numpy()[:, None]
    km = KMeans(8, init=init, n_init=1, algorithm="lloyd", max_iter=300, tol=0).fit(v)
    np.testing.assert_allclose(np.sort(c.numpy()), np.sort(km.cluster_centers_[:, 0]), rtol=1e-5, atol=1e-6)
    assert (codes[~mask] == -1).all() and (codes[mask] >= 0).all()


@pytest.mark.parametrize("counts", [{0: 1, 1: 1}, {i: i * i + 1 for i in range(20)}, {i: 2 ** i for i in range(12)},
                                    {i: random.Random(i).randint(1, 1000) for i in range(32)}])
def test_huffman_lengths_are_optimal(counts):
    L = huffman_lengths(counts)
    assert sum(2.0 ** -l for l in L.values()) == 1.0   # complete prefix code
    n = sum(counts.values()); avg = sum(counts[s] * L[s] for s in counts) / n
    H = -sum(c / n * math.log2(c / n) for c in counts.values())
    assert H - 1e-9 <= avg < H + 1
    # total cost of an optimal code = sum of all merged weights (independent reference)
    import heapq
    h = list(counts.values()); heapq.heapify(h); cost = 0
    while len(h) > 1:
        a, b = heapq.heappop(h), heapq.heappop(h); cost += a + b; heapq.heappush(h, a + b)
    assert sum(counts[s] * L[s] for s in counts) == cost


def test_huffman_roundtrip_random():
    rng = random.Random(0)
    msg = [min(int(rng.expovariate(0.3)), 40) for _ in range(5000)]
    L = huffman_lengths({s: msg.count(s) for s in set(msg)})
    codes = canonical_codes(L)
    assert len({format(c, f"0{l}b") for c, l in codes.values()}) == len(codes)
    data, n = huffman_encode(msg, L)
    assert n == sum(L[s] for s in msg)
    assert huffman_decode(data, n, L, len(msg)) == msg


@pytest.mark.parametrize("index_bits", [1, 3, 5, 8])
def test_relative_index_roundtrip(index_bits):
    rng = np.random.default_rng(index_bits)
    pos = np.sort(rng.choice(10000, 137, replace=False))
    syms = relative_index(pos, index_bits)
    assert syms.max() < 2 ** index_bits
    np.testing.assert_array_equal(absolute_index(syms, index_bits), pos)


@pytest.mark.parametrize("shape,sparsity,bits,index_bits", [((40, 30), 0.9, 5, 5), ((8, 3, 3, 3), 0.5, 8, 8),
                                                             ((1000,), 0.99, 2, 4), ((17, 5), 0.0, 1, 1), ((64, 64), 0.95, 6, 3)])
def test_encode_decode_bit_exact(shape, sparsity, bits, index_bits):
    sw, c, codes = _shared(shape, sparsity, bits, seed=sum(shape))
    data = encode_layer(sw, bits, index_bits)
    back = decode_layer(data)
    assert back.dtype == torch.float32 and back.shape == sw.shape
    assert torch.equal(back.view(torch.int32), sw.view(torch.int32))


def test_every_truncation_and_bit_flip_is_an_artifact_error():
    sw, _, _ = _shared((30, 20), 0.8, 4, seed=5)
    data = encode_layer(sw, 4, 5)
    for n in range(len(data)):
        with pytest.raises(ArtifactError): decode_layer(data[:n])
    rng = random.Random(1)
    for _ in range(200):
        b = bytearray(data); i = rng.randrange(len(b)); b[i] ^= 1 << rng.randrange(8)
        with pytest.raises(ArtifactError): decode_layer(bytes(b))
    with pytest.raises(ArtifactError, match="expected bytes"): decode_layer("EKDC")


def test_forged_header_with_valid_crc_is_an_artifact_error():
    import struct, zlib
    sw, _, _ = _shared((12, 9), 0.5, 3, seed=2)
    data = encode_layer(sw, 3, 4)
    off = 5 + 1 + 2 * 4   # magic, ndim, shape
    for pos, value, msg in [(off, 9, "bits=9"), (off + 1, 0, "index_bits=0"), (off + 2, 200, "codebook=200")]:
        body = bytearray(data[:-4]); body[pos] = value
        with pytest.raises(ArtifactError, match=msg): decode_layer(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))
    body = bytearray(data[:-4]); struct.pack_into("<I", body, 1 + 5, 1)   # shape (1, 9): fewer entries than nonzeros
    with pytest.raises(ArtifactError, match="nonzeros=54, entries=9"): decode_layer(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))


def test_encode_refuses_bad_input():
    with pytest.raises(ConfigError, match="at most 4"): encode_layer(torch.arange(1.0, 6.0), bits=2)
    with pytest.raises(ConfigError, match="bits must be <= 8, got 9"): encode_layer(torch.ones(3), bits=9)
    with pytest.raises(ConfigError, match="index_bits must be >= 1, got 0"): encode_layer(torch.ones(3), index_bits=0)
    with pytest.raises(ConfigError, match="NaN or Inf"): encode_layer(torch.tensor([float("inf")]))


def test_centroid_cb_keeps_zeros_and_sharing():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 12, generator=g), torch.randint(0, 3, (96,), generator=g)
    dls = from_tensors(x, y, x[:32], y[:32], batch_size=16, seed=0)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad(): m[0].weight[:, :4] = 0
    shared = share_weights(m, bits=2)
    before = {n: c.clone() for n, (c, _) in shared.items()}
    cb = CentroidCB(shared, lr=1e-2)
    Learner(m, dls, lr=1e-2, cbs=[cb], progress=False).fit(2)
    for n, (c, codes) in cb.shared.items():
        w = dict(m.named_modules())[n].weight.detach()
        assert torch.equal(w, shared_weight(c, codes))
        assert not torch.equal(c, before[n])   # the centroids moved
    assert (m[0].weight[:, :4] == 0).all()


def test_fully_pruned_layer_is_left_alone():
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad(): m[2].weight.zero_()
    shared = share_weights(m, bits=2)
    assert list(shared) == ["0"] and (m[2].weight == 0).all()
    assert torch.equal(decode_layer(encode_model(m, bits=2)["2.weight"]), torch.zeros(2, 5))


def test_deep_compress_and_ratio_from_bytes():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 20, generator=g), torch.randint(0, 4, (128,), generator=g)
    dls = from_tensors(x, y, x[:32], y[:32], batch_size=32, seed=0)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    dc, shared = deep_compress(m, dls, sparsity={"0": 0.8, "2": 0.5}, bits=3, prune_epochs=1, share_epochs=1)
    assert int((dc[0].weight != 0).sum()) == 20 * 64 - round(0.8 * 20 * 64) and int((dc[2].weight != 0).sum()) == 128
    assert all(len(torch.unique(dc[i].weight[dc[i].weight != 0])) <= 8 for i in (0, 2))
    enc = encode_model(dc, bits=3)
    rows = compression_table(dc, enc)
    dense = 4 * sum(p.numel() for p in dc.parameters())
    assert rows[-1]["dense_bytes"] == dense
    assert rows[-1]["bytes"] == sum(len(b) for b in enc.values()) + 4 * (64 + 4)
    assert rows[-1]["ratio"] == pytest.approx(dense / rows[-1]["bytes"])
    sd = dc.state_dict()
    for k, b in enc.items(): assert torch.equal(decode_layer(b), sd[k])
    # biases shared and encoded too: every tensor comes back bit-exactly into a fresh model, and the ratio grows
    share_weights(dc, 4, attr="bias")
    enc_b = encode_model(dc, bits=3, bias_bits=4)
    assert sorted(enc_b) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    fresh = decode_model(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)), enc_b)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), dc.state_dict().values()))
    rows_b = compression_table(dc, enc_b)
    assert rows_b[-1]["bytes"] == sum(len(b) for b in enc_b.values()) and rows_b[-1]["ratio"] > rows[-1]["ratio"]
    with pytest.raises(ShapeError, match="decodes to shape"): decode_model(nn.Sequential(nn.Linear(20, 65), nn.ReLU(), nn.Linear(65, 4)), enc_b)
    with pytest.raises(ConfigError, match="is not a tensor of the model"): compression_table(nn.Linear(2, 2), enc_b)
