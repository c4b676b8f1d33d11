"""Data-parallel Learner (`edgekd.distributed`): 2 CPU processes with gloo reproduce 1 process at the same global batch."""
import io
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from edgekd.cache import batch_loader, with_cached_logits
from edgekd.core import ConfigError, set_seed
from edgekd.distributed import DistributedCB, ShardSampler, init_distributed, is_distributed, launch, shard_loader
from edgekd.kd import DistillationCB
from edgekd.learner import Callback, CheckpointCB, Learner, ProgressCB, SchedulerCB

torch.set_num_threads(1)
EPOCHS, GLOBAL_BATCH = 3, 32


def blobs():
    "320 points of four overlapping Gaussian blobs: 256 to train, 64 to validate."
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (320,), generator=g)
    x = torch.tensor([[2., 2.], [-2., 2.], [-2., -2.], [2., -2.]])[y] + 1.5 * torch.randn(320, 2, generator=g)
    return x, y


def models():
    set_seed(1); teacher = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    set_seed(0); student = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 4))
    return teacher, student


def train_sets(cache_dir):
    "Two training setups: a live teacher on a standard DataLoader, and cached logits on a whole-batch loader."
    x, y = blobs()
    teacher, _ = models()
    valid = DataLoader(TensorDataset(x[256:], y[256:]), batch_size=16)
    live = SimpleNamespace(train=DataLoader(TensorDataset(x[:256], y[:256]), batch_size=GLOBAL_BATCH, shuffle=True), valid=valid)
    cached = SimpleNamespace(train=batch_loader(with_cached_logits(TensorDataset(x[:256], y[:256]), teacher, cache_dir), GLOBAL_BATCH),
                             valid=valid)
    return dict(live=(live, teacher), cached=(cached, None))


def _worker(rank, world, out_dir):
    "One rank: distil with DistributedCB, a one-cycle schedule and a checkpoint; save what the test compares."
    torch.set_num_threads(1)
    res = {}
    for name, (dls, teacher) in train_sets(f"{out_dir}/cache").items():
        _, student = models()
        buf, ck = io.StringIO(), CheckpointCB(f"{out_dir}/{name}.pt", monitor='valid_loss')
        learn = Learner(student, dls, lr=0.05, cbs=[DistributedCB(seed=0), DistillationCB(teacher, 2.0, 0.5), SchedulerCB(),
                                                    ProgressCB(plain=True, file=buf), ck])
        learn.fit(EPOCHS)
        res[name] = dict(weights=student.state_dict(), history=learn.history, printed=buf.getvalue(),
                         saved=ck.saved_epochs, after=(learn.rank, learn.world_size, learn.parallel_model is None, learn.dls is dls))
    torch.save(res, f"{out_dir}/rank{rank}.pt")


class SetEpoch(Callback):
    def __init__(self, sampler): self.sampler = sampler
    def before_epoch(self, learn): self.sampler.set_epoch(learn.epoch)


def single_process(name, cache_dir):
    "The reference: one process, no process group, the 1-process sampler at the same global batch."
    dls, teacher = train_sets(cache_dir)[name]
    _, student = models()
    train = shard_loader(dls.train, 0, 1, train=True, seed=0)
    sampler = train.sampler if train.batch_size is not None else train.sampler.sampler
    learn = Learner(student, SimpleNamespace(train=train, valid=dls.valid), lr=0.05, progress=False,
                    cbs=[DistillationCB(teacher, 2.0, 0.5), SchedulerCB(), SetEpoch(sampler)])
    learn.fit(EPOCHS)
    return student.state_dict(), learn.history


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch(_worker, 2, str(out), backend="gloo")
    return out, [torch.load(out/f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("name", ["live", "cached"])
def test_two_gloo_processes_match_one_process_at_the_same_global_batch(two_ranks, name):
    out, ranks = two_ranks
    w1, h1 = single_process(name, out/"cache")
    for r in ranks:
        for k, v in w1.items(): torch.testing.assert_close(r[name]["weights"][k], v, rtol=0, atol=1e-5)
        assert len(r[name]["history"]) == EPOCHS
        for a, b in zip(r[name]["history"], h1):
            for k in ("train_loss", "valid_loss", "valid_accuracy"): assert a[k] == pytest.approx(b[k], abs=1e-5), (k, a, b)
    # the two ranks hold the very same weights and the same (reduced) metrics
    for k, v in ranks[0][name]["weights"].items(): assert torch.equal(v, ranks[1][name]["weights"][k])
    assert [h["valid_loss"] for h in ranks[0][name]["history"]] == [h["valid_loss"] for h in ranks[1][name]["history"]]


@pytest.mark.parametrize("name", ["live", "cached"])
def test_only_rank_0_logs_and_checkpoints(two_ranks, name):
    out, ranks = two_ranks
    assert ranks[0][name]["printed"].count("epoch ") == EPOCHS and ranks[1][name]["printed"] == ""
    assert ranks[0][name]["saved"] and ranks[1][name]["saved"] == []
    assert (out/f"{name}.pt").is_file()
    for r in ranks: assert r[name]["after"] == (0, 1, True, True)       # cleanup gave the learner back


def test_without_a_process_group_nothing_changes():
    assert not is_distributed()
    x, y = blobs()
    def fit(cbs):
        _, student = models()
        dls = SimpleNamespace(train=DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32, shuffle=True,
                                               generator=torch.Generator().manual_seed(0)), valid=None)
        Learner(student, dls, lr=0.05, progress=False, cbs=cbs).fit(2)
        return student.state_dict()
    a, b = fit([]), fit([DistributedCB()])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharding_rules():
    assert sorted(sum((list(ShardSampler(10, r, 3)) for r in range(3)), [])) == list(range(10))
    ds = TensorDataset(torch.arange(40.))
    with pytest.raises(ConfigError, match="global batch size 15 must be a multiple of the number of processes 2"):
        shard_loader(DataLoader(ds, batch_size=15), 0, 2, train=True)
    two = [shard_loader(DataLoader(ds, batch_size=8), r, 2, train=True, seed=3) for r in range(2)]
    one = shard_loader(DataLoader(ds, batch_size=8), 0, 1, train=True, seed=3)
    for a, b, c in zip(one, *two):
        assert sorted(a[0].tolist()) == sorted(b[0].tolist() + c[0].tolist())
    assert isinstance(one.sampler, DistributedSampler)


def test_init_distributed_explains_how_to_launch(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"): monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node=N"): init_distributed()
