"""Teacher-logit cache (`edgekd.cache`): keys, atomic writes, memory-mapped reads, shuffled loaders, bit-identical distillation."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgekd.cache import (batch_loader, cache_teacher_logits, data_fingerprint, load_logits, logit_cache_path,
                          model_fingerprint, with_cached_logits)
from edgekd.core import ArtifactError, ConfigError, set_seed
from edgekd.kd import DistillationCB, model_logits
from edgekd.learner import Callback, Learner
from edgekd.models import CNN, MLP

torch.set_num_threads(1)


@pytest.fixture
def setup():
    set_seed(0)
    x = torch.randn(600, 1, 40)
    teacher = CNN((1, 40), 10, channels=(8, 16)).eval()
    with torch.no_grad():                                   # non-trivial batch-norm statistics
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm1d): m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
    return x, teacher


def test_cached_logits_are_bit_identical_to_the_teacher(setup, tmp_path):
    x, teacher = setup
    path = cache_teacher_logits(teacher, x, tmp_path, batch_size=128)
    cached = load_logits(path)
    if os.path.exists('/proc/self/maps'): assert str(path) in open('/proc/self/maps').read()   # the file is mapped, not read
    assert torch.equal(cached, model_logits(teacher, x, batch_size=1000))
    assert path.stat().st_size == 600 * 10 * 4 + 128                     # float32 rows + the .npy header
    with torch.no_grad():                                                # any shuffled subset, any batch size
        idx = torch.randperm(600, generator=torch.Generator().manual_seed(1))[:37]
        assert torch.equal(teacher(x[idx]), cached[idx])


def test_the_key_follows_teacher_data_and_transform(setup, tmp_path):
    x, teacher = setup
    twin = CNN((1, 40), 10, channels=(8, 16)); twin.load_state_dict(teacher.state_dict())
    assert model_fingerprint(twin) == model_fingerprint(teacher)
    with torch.no_grad(): twin.features[1].bn.running_var[0] += 1e-3
    assert model_fingerprint(twin) != model_fingerprint(teacher)
    other_arch = MLP((1, 40), 10, widths=(8,))
    assert model_fingerprint(other_arch) != model_fingerprint(teacher)
    assert data_fingerprint(x) == data_fingerprint(x.clone())
    assert data_fingerprint(x) != data_fingerprint(x[torch.arange(599, -1, -1)])
    assert data_fingerprint(x) != data_fingerprint(x, torch.tanh)
    with pytest.raises(ConfigError, match="no name that is stable across processes"): data_fingerprint(x, lambda t: t)
    p1 = cache_teacher_logits(teacher, x, tmp_path)
    p2 = cache_teacher_logits(teacher, x, tmp_path, transform=torch.tanh)
    assert p1 != p2 and p1 == logit_cache_path(teacher, x, tmp_path)
    assert torch.equal(load_logits(p2), model_logits(teacher, torch.tanh(x)))


def test_reuse_does_not_call_the_teacher(setup, tmp_path):
    x, teacher = setup
    calls = []
    h = teacher.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    try:
        p = cache_teacher_logits(teacher, x, tmp_path, batch_size=256)
        assert calls == [256, 256, 88]
        mtime = p.stat().st_mtime_ns
        assert cache_teacher_logits(teacher, x, tmp_path) == p and calls == [256, 256, 88] and p.stat().st_mtime_ns == mtime
    finally: h.remove()


def test_a_failed_write_leaves_no_file(setup, tmp_path):
    x, _ = setup
    class Crash(nn.Module):
        def __init__(self): super().__init__(); self.lin, self.n = nn.Linear(40, 10), 0
        def forward(self, t):
            self.n += 1
            if self.n == 2: raise RuntimeError("crash on chunk 2")
            return self.lin(t.flatten(1))
    with pytest.raises(RuntimeError, match="crash on chunk 2"): cache_teacher_logits(Crash(), x, tmp_path, batch_size=100)
    assert list(tmp_path.iterdir()) == []


def test_bad_files_are_reported(tmp_path):
    (tmp_path/"a.npy").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="is corrupt or not a .npy file"): load_logits(tmp_path/"a.npy")
    np.save(tmp_path/"b.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(ArtifactError, match=r"holds float32 of shape \(5,\), expected float32 of shape \(n, classes\)"):
        load_logits(tmp_path/"b.npy")
    with pytest.raises(ArtifactError, match="not found"): load_logits(tmp_path/"c.npy")


def test_shuffled_loader_keeps_logits_with_their_samples(setup, tmp_path):
    x, teacher = setup
    y = torch.randint(0, 10, (600,))
    ds = with_cached_logits(TensorDataset(x, y), teacher, tmp_path)
    seen = []
    for xb, yb, tb in batch_loader(ds, 64, seed=3):
        with torch.no_grad(): assert torch.equal(teacher(xb), tb)
        seen.append(xb)
    assert not torch.equal(torch.cat(seen), x)                        # shuffled ...
    assert torch.equal(torch.cat(seen).sort(0).values, x.sort(0).values)   # ... a permutation of the data


class Record(Callback):
    def before_fit(self, learn): self.losses = []
    def after_batch(self, learn):
        if learn.training: self.losses.append(learn.loss.detach().clone())


@pytest.mark.parametrize("labeled", [False, True])
def test_distilling_from_the_cache_is_bit_identical_to_the_live_teacher(setup, tmp_path, labeled):
    x, teacher = setup
    y = torch.randint(0, 10, (600,), generator=torch.Generator().manual_seed(2))
    data = TensorDataset(x, y) if labeled else TensorDataset(x)
    def run(ds, t):
        set_seed(0); student, rec = MLP((1, 40), 10, widths=(16,)), Record()
        Learner(student, SimpleNamespace(train=batch_loader(ds, 50, seed=0), valid=None), lr=3e-3,
                cbs=[DistillationCB(t, 3.0, 0.7), rec], progress=False).fit(2)
        return torch.stack(rec.losses), student.state_dict()
    live_l, live_w = run(data, teacher)
    cached_l, cached_w = run(with_cached_logits(data, teacher, tmp_path), None)
    assert len(live_l) == 24 and torch.equal(live_l, cached_l)
    assert all(torch.equal(live_w[k], cached_w[k]) for k in live_w)
