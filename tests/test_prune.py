"""Independent checks of edgekd.prune against torch.nn.utils.prune and Torch-Pruning, on models outside edgekd's zoo."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from edgekd.core import ArtifactError, ConfigError
from edgekd import prune as P

torch.set_num_threads(1)


def _net(seed=0):
    "A small conv net with biases, a 1-D conv branch-free chain and a flattening head (not a zoo model)."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(12, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(),
                         nn.Flatten(), nn.Linear(20 * 4 * 4, 30), nn.ReLU(), nn.Linear(30, 5)).eval()


@pytest.mark.parametrize("amount", [0.05, 0.33, 0.5, 0.9, 0.99])
def test_l1_and_global_masks_match_torch(amount):
    net = _net(1)
    ref = copy.deepcopy(net)
    for m in P.prunable_layers(ref).values(): prune.l1_unstructured(m, "weight", amount=amount)
    for (n, m), r in zip(P.prunable_layers(net).items(), P.prunable_layers(ref).values()):
        assert torch.equal(P.magnitude_mask(m.weight, amount).float(), r.weight_mask)
    ref = copy.deepcopy(net)
    prune.global_unstructured([(m, "weight") for m in P.prunable_layers(ref).values()], prune.L1Unstructured, amount=amount)
    masks = P.compute_masks(net, amount, "global")
    for n, r in P.prunable_layers(ref).items(): assert torch.equal(masks[n].float(), r.weight_mask)


@pytest.mark.parametrize("n,dim", [(1, 0), (2, 0), (2, 1), (3, 0)])
def test_ln_structured_matches_torch(n, dim):
    net = _net(2)
    for m in P.prunable_layers(net).values():
        ref = copy.deepcopy(m)
        prune.ln_structured(ref, "weight", amount=0.4, n=n, dim=dim)
        assert torch.equal(P.ln_structured_mask(m.weight, 0.4, n, dim).float(), ref.weight_mask)


@pytest.mark.parametrize("seed", [0, 11, 123])
def test_random_masks_match_torch_with_same_generator_state(seed):
    for m in P.prunable_layers(_net(3)).values():
        ref = copy.deepcopy(m)
        torch.manual_seed(seed); prune.random_unstructured(ref, "weight", amount=0.6)
        assert torch.equal(P.random_mask(m.weight, 0.6, torch.Generator().manual_seed(seed)).float(), ref.weight_mask)
        ref = copy.deepcopy(m)
        torch.manual_seed(seed); prune.random_structured(ref, "weight", amount=0.6, dim=0)
        got = P.random_mask(m.weight, 0.6, torch.Generator().manual_seed(seed), structured=True)
        assert torch.equal(got.float(), ref.weight_mask)


def test_chain_pruner_matches_torch_pruning():
    import torch_pruning as tp
    x = torch.randn(4, 3, 8, 8)
    for seed in range(3):
        net = _net(seed)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d): m.running_var.uniform_(0.5, 2); m.running_mean.uniform_(-1, 1)
        ours = P.prune_chain(net, P.chain_keep(P.channel_importance(net, "l1", x), 0.5), x)
        theirs = copy.deepcopy(net)
        imp = tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None)
        tp.pruner.MetaPruner(theirs, x, importance=imp, pruning_ratio=0.5, ignored_layers=[theirs[-1]]).step()
        for a, b in zip(ours.modules(), theirs.modules()):
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if getattr(a, attr, None) is not None: assert torch.equal(getattr(a, attr), getattr(b, attr))
        with torch.no_grad(): assert torch.equal(ours(x), theirs(x))


def test_depgraph_on_torchvision_resnet():
    import torchvision as tv
    torch.manual_seed(0)
    net = tv.models.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    small = P.depgraph_prune(net, 0.5, "group", x)
    with torch.no_grad(): assert small(x).shape == (2, 7)
    assert small.conv1.out_channels == 32 and small.layer1[0].conv2.out_channels == small.conv1.out_channels
    assert sum(p.numel() for p in small.parameters()) < 0.3 * sum(p.numel() for p in net.parameters())
    assert net.conv1.out_channels == 64   # original untouched


def test_masks_survive_training_and_fold():
    from types import SimpleNamespace
    from edgekd.learner import Learner
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 3, (64,))
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    masks = P.compute_masks(net, 0.7)
    Learner(net, SimpleNamespace(train=dl, valid=None, test=None), lr=1e-2, wd=0.1, cbs=[P.MaskCB(masks)], progress=False).fit(3)
    for n, m in P.prunable_layers(net).items(): assert m.weight[~masks[n]].abs().max().item() == 0.0
    ref = copy.deepcopy(net)
    for m in P.prunable_layers(ref).values(): prune.l1_unstructured(m, "weight", amount=0.5)
    P.fold_masks(ref)
    assert not any(k.endswith(("_orig", "_mask")) for k in ref.state_dict())
    w = ref[1].weight.detach()
    assert not torch.signbit(w[w == 0]).any()   # zeros stored as +0.0, so the sparse encodings round-trip bit-exactly
    enc = P.bitmask_encode(w)
    assert np.array_equal(P.bitmask_decode(enc).numpy().view(np.uint32), w.numpy().view(np.uint32))


def test_sparse_encodings_roundtrip_bit_exact():
    g = torch.Generator().manual_seed(0)
    for shape, density in [((50, 70), 0.1), ((8, 3, 5, 5), 0.5), ((13,), 0.0), ((4, 100_000), 0.01)]:
        w = torch.randn(shape, generator=g).masked_fill(torch.rand(shape, generator=g) >= density, 0.0)
        for enc, dec in [(P.csr_encode, P.csr_decode), (P.bitmask_encode, P.bitmask_decode)]:
            back = dec(enc(w))
            assert back.shape == w.shape and torch.equal(back, w)
            assert np.array_equal(back.numpy().view(np.uint32), w.numpy().view(np.uint32))   # bit-exact


def test_gradual_schedule_formula():
    for t in range(0, 51, 7):
        assert P.gradual_sparsity(t, 0.95, 0.05, 50) == pytest.approx(0.95 + (0.05 - 0.95) * (1 - t / 50) ** 3, abs=1e-12)


def test_bad_inputs(tmp_path):
    net = _net()
    for s in (1.0, -0.01, 2):
        with pytest.raises(ConfigError, match="sparsity must be"): P.compute_masks(net, s)
    with pytest.raises(ConfigError, match="unknown layer 'nope'"): P.compute_masks(net, 0.5, layers=["nope"])
    with pytest.raises(ConfigError, match="would remove all 12 channels of layer '0'"):
        P.chain_keep(P.channel_importance(net, example_input=torch.randn(2, 3, 8, 8)), 0.99)
    with pytest.raises(ConfigError, match="is a BatchNorm2d; weight masks apply to Linear and Conv"):
        P.compute_masks(net, 0.5, layers=["1"])
    with pytest.raises(ConfigError, match="which the chain pruner cannot handle"):
        P.chain_layers(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)), torch.randn(2, 4))
    small = P.depgraph_prune(net, 0.5, example_input=torch.randn(2, 3, 8, 8))
    path = P.save_pruned(small, tmp_path / "small.pt")
    with pytest.raises(ArtifactError, match="does not fit"):
        P.load_pruned(path, nn.Sequential(nn.Flatten(), nn.Linear(192, 5)))
    back = P.load_pruned(path, _net())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(): assert torch.equal(back(x), small(x))
