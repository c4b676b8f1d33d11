"""Lifecycle of `edgekd.learner.Learner`: teardown after failed fits, model swaps mid-fit, exported and PT2E-prepared graphs."""
import copy
import warnings

import pytest
import torch
from torch import nn

from edgekd.core import ArtifactError, is_exported, set_seed
from edgekd.data import from_tensors
from edgekd.learner import Callback, EarlyStoppingCB, Learner, SchedulerCB
from edgekd.models import MLP

torch.set_num_threads(1)


def blob_dls(seed=0):
    "Four separable Gaussian blobs in 2-D: 448 training points (358 train + 90 valid) and 192 test points."
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (640,), generator=g)
    centres = torch.tensor([[3., 3.], [-3., 3.], [-3., -3.], [3., -3.]])
    x = centres[y] + 0.7 * torch.randn(640, 2, generator=g)
    return from_tensors(x[:448], y[:448], x[448:], y[448:], batch_size=64, seed=seed)


def weights(model): return [p.detach().clone() for p in model.parameters()]


class FreezeHookCB(Callback):
    "Freeze `module` and hook its forward in before_fit, as a distillation callback does with its teacher."
    def __init__(self, module): self.module, self.handle, self.was, self.cleanups = module, None, [], 0
    def before_fit(self, learn):
        self.was = [p.requires_grad for p in self.module.parameters()]
        for p in self.module.parameters(): p.requires_grad_(False)
        self.handle = self.module.register_forward_hook(lambda m, i, o: None)
    def cleanup(self, learn):
        self.cleanups += 1
        if self.handle is not None: self.handle.remove(); self.handle = None
        for p, w in zip(self.module.parameters(), self.was): p.requires_grad_(w)


class RaiseCB(Callback):
    def __init__(self, event, exc, at_iter=1):
        self.exc, self.at_iter = exc, at_iter
        setattr(self, event, self._raise)
    def _raise(self, learn):
        if learn.iter >= self.at_iter: raise self.exc


def n_hooks(m): return sum(len(s._forward_hooks) + len(s._forward_pre_hooks) for s in m.modules())


@pytest.mark.parametrize("event", ["after_batch", "after_loss", "before_batch", "after_epoch"])
def test_failing_fit_leaves_no_hook_and_no_frozen_module(event):
    set_seed(0)
    dls = blob_dls()
    teacher, student = MLP((2,), 4, widths=(8,)), MLP((2,), 4, widths=(8,))
    fh = FreezeHookCB(teacher)
    learn = Learner(student, dls, progress=False)
    n_cbs, hooks0 = len(learn.cbs), n_hooks(teacher)      # zoo models carry their own input-shape pre-hook
    with pytest.raises(ZeroDivisionError) as info:
        learn.fit(2, cbs=[fh, RaiseCB(event, ZeroDivisionError("bad batch 2"))])
    assert str(info.value) == "bad batch 2" and info.type is ZeroDivisionError
    assert [p.requires_grad for p in teacher.parameters()] == [True] * 4
    assert n_hooks(teacher) == hooks0 and fh.cleanups == 1
    assert len(learn.cbs) == n_cbs            # fit-only callbacks removed
    x = torch.randn(5, 2)
    with torch.no_grad(): assert torch.equal(student(x), student(x))


def test_cleanup_runs_for_every_callback_even_when_before_fit_fails():
    dls = blob_dls()
    fhs = [FreezeHookCB(nn.Linear(2, 2)) for _ in range(3)]
    boom = RaiseCB("before_fit", KeyError("no teacher"), at_iter=0)
    boom.order = -100                          # runs before every other before_fit
    with pytest.raises(KeyError, match="no teacher"):
        Learner(nn.Linear(2, 4), dls, progress=False).fit(1, cbs=[*fhs, boom])
    assert [f.cleanups for f in fhs] == [1, 1, 1]


def test_cleanup_order_is_reversed():
    seen = []
    class C(Callback):
        def __init__(self, order): self.order = order
        def cleanup(self, learn): seen.append(self.order)
    Learner(nn.Linear(2, 4), blob_dls(), progress=False).fit(1, cbs=[C(5), C(-3), C(20)])
    assert seen == [20, 5, -3]


def test_cleanup_error_never_replaces_the_original_error():
    class Bad(Callback):
        def cleanup(self, learn): raise RuntimeError("hook already removed")
    fh = FreezeHookCB(nn.Linear(2, 2))
    learn = Learner(nn.Linear(2, 4), blob_dls(), progress=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="shape mismatch") as info:
            learn.fit(1, cbs=[Bad(), fh, RaiseCB("after_pred", ValueError("shape mismatch"))])
    assert info.value.__notes__ == ["during teardown after this error, Bad.cleanup raised RuntimeError: hook already removed"]
    assert any(issubclass(m.category, RuntimeWarning) and "hook already removed" in str(m.message) for m in w)
    assert fh.cleanups == 1 and n_hooks(fh.module) == 0
    with pytest.raises(RuntimeError, match="hook already removed"):      # after a successful fit it is raised
        learn.fit(1, cbs=[Bad()])


def test_keyboard_interrupt_propagates_after_cleanup():
    fh = FreezeHookCB(nn.Linear(2, 2))
    with pytest.raises(KeyboardInterrupt):
        Learner(nn.Linear(2, 4), blob_dls(), progress=False).fit(1, cbs=[fh, RaiseCB("after_step", KeyboardInterrupt())])
    assert fh.cleanups == 1 and n_hooks(fh.module) == 0


def test_replace_model_mid_fit_with_another_architecture():
    set_seed(0)
    dls = blob_dls()

    class Widen(Callback):
        "After epoch 1, continue with a wider network (a stand-in for a structural change)."
        def after_epoch(self, learn):
            if learn.epoch == 0:
                self.old, self.old_w = learn.model, weights(learn.model)
                learn.replace_model(MLP((2,), 4, widths=(32,)))
        def after_replace_model(self, learn): self.saw = (learn.old_model is self.old, learn.model.training)

    widen = Widen()
    learn = Learner(MLP((2,), 4, widths=(4,)), dls, lr=0.02, progress=False)
    learn.fit(4, cbs=[widen])
    assert widen.saw == (True, False)                # fired after training, so in eval mode (after_epoch)
    assert [p is q for p, q in zip(learn.opt.param_groups[0]["params"], learn.model.parameters())] == [True] * 4
    assert learn.model.features[1].weight.shape == (32, 2)
    for a, b in zip(widen.old_w, weights(widen.old)): assert torch.equal(a, b)
    losses = [r["train_loss"] for r in learn.history]
    assert losses[1] > losses[2] > losses[3], losses   # the new model trains
    assert learn.evaluate(dls.test)["accuracy"] > 0.9


def test_replace_model_keeps_the_scheduled_lr():
    rec = {}
    class SwapAt(Callback):
        order = SchedulerCB.order + 1
        def before_batch(self, learn):
            if learn.training and learn.epoch == 1 and learn.iter == 2:
                rec["before"] = learn.opt.param_groups[0]["lr"]
                learn.replace_model(copy.deepcopy(learn.model))
                rec["after"] = learn.opt.param_groups[0]["lr"]
                rec["mode"] = learn.model.training
    learn = Learner(nn.Linear(2, 4), blob_dls(), lr=0.01, wd=0.05, progress=False)
    learn.fit(2, cbs=[SchedulerCB("onecycle"), SwapAt()])
    assert rec["before"] == rec["after"] and 0 < rec["after"] < 0.01 and rec["mode"] is True
    assert learn.opt.param_groups[0]["weight_decay"] == 0.05


def test_early_stopping_after_replace_restores_the_new_model():
    dls = blob_dls()
    class Shrink(Callback):
        order = 80
        def after_epoch(self, learn):
            if learn.epoch == 1: learn.replace_model(MLP((2,), 4, widths=(3,)))
    learn = Learner(MLP((2,), 4, widths=(16,)), dls, lr=0.01, progress=False)
    learn.fit(4, cbs=[EarlyStoppingCB(patience=5), Shrink()])   # must not try to load 16-wide weights into 3-wide
    assert learn.model.features[1].weight.shape == (3, 2)


def test_exported_graph_trains_and_ends_in_eval_mode():
    set_seed(0)
    dls = blob_dls()
    eager = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))
    graph = torch.export.export(eager, (torch.randn(4, 2),), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    assert is_exported(graph)
    with pytest.raises(NotImplementedError): graph.train()
    w0 = weights(graph)
    learn = Learner(graph, dls, lr=0.05, progress=False)
    learn.fit(1)
    assert all(not torch.equal(a, b) for a, b in zip(w0, weights(graph)))
    x = torch.randn(7, 2)
    with torch.no_grad(): assert torch.equal(graph(x), graph(x))     # dropout off after fit
    assert learn.evaluate(dls.test)["accuracy"] > 0.9


def test_pt2e_qat_prepared_model_trains_an_epoch():
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    set_seed(0)
    dls = blob_dls()
    eager = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 4))
    graph = torch.export.export(eager, (torch.randn(4, 2),), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    prepared = prepare_qat_pt2e(graph, quantizer)
    fq = [m for n, m in prepared.named_modules() if n.startswith("activation_post_process")]
    assert fq, "prepare_qat_pt2e inserted no fake-quantize modules"
    w0 = weights(prepared)
    learn = Learner(prepared, dls, lr=0.05, progress=False)
    learn.fit(1)
    assert all(not torch.equal(a, b) for a, b in zip(w0, weights(prepared)))
    rec = learn.history[0]
    assert rec["train_loss"] == rec["train_loss"] and rec["valid_accuracy"] is not None
    # (observers keep updating in eval mode unless a QAT callback disables them, so two evaluations may differ slightly)
    assert learn.evaluate(dls.test)["accuracy"] > 0.9


def test_load_rejects_another_architecture(tmp_path):
    dls = blob_dls()
    a = Learner(MLP((2,), 4, widths=(8,)), dls, progress=False)
    f = a.save(tmp_path / "a.pt")
    b = Learner(MLP((2,), 4, widths=(5,)), dls, progress=False)
    with pytest.raises(ArtifactError, match="does not fit this model"):
        b.load(f)
    b.load(f, replace=True)
    assert b.model.features[1].weight.shape == (8, 2)


def test_parallel_model_runs_training_batches_only_and_single_process_is_unchanged():
    "`learn.parallel_model` (a DDP wrapper in chapter 63) runs the training forward passes; validation and evaluation use `learn.model`."
    set_seed(0)
    dls = blob_dls()
    model = MLP((2,), 4, widths=(8,))
    calls = {"wrapper": 0}
    class Wrapper(nn.Module):
        def __init__(self, m): super().__init__(); self.m = m
        def forward(self, x): calls["wrapper"] += 1; return self.m(x)
    learn = Learner(model, dls, progress=False)
    assert (learn.rank, learn.world_size, learn.parallel_model) == (0, 1, None)
    assert learn.reduce_sum([1, 2.5]) == [1.0, 2.5]
    learn.parallel_model = Wrapper(model)
    learn.fit(1)
    assert calls["wrapper"] == len(dls.train)
    set_seed(0)
    ref = Learner(MLP((2,), 4, widths=(8,)), blob_dls(), progress=False)
    ref.fit(1)
    for a, b in zip(weights(ref.model), weights(model)): assert torch.equal(a, b)


def test_metrics_are_reduced_and_only_rank_0_reports(tmp_path):
    import io
    from edgekd.learner import CheckpointCB, ProgressCB
    set_seed(0)
    out, ck = io.StringIO(), CheckpointCB(tmp_path/"best.pt")
    learn = Learner(MLP((2,), 4, widths=(8,)), blob_dls(), progress=False, cbs=[ProgressCB(plain=True, file=out), ck])
    seen = []
    def fake_reduce(values):
        seen.append(list(values))
        return [v * 2 for v in values]        # the other rank had identical counts: means are unchanged
    learn.rank, learn.world_size, learn.reduce_sum = 1, 2, fake_reduce
    learn.fit(2)
    assert out.getvalue() == "" and ck.saved_epochs == [] and list(tmp_path.iterdir()) == []
    assert len(seen) == 2 and len(seen[0]) == 6 and seen[0][1] == 358 and seen[0][5] == 90   # train count, labeled valid count
    set_seed(0)
    ref = Learner(MLP((2,), 4, widths=(8,)), blob_dls(), progress=False)
    ref.fit(2)
    for a, b in zip(learn.history, ref.history):
        for k in ("train_loss", "valid_loss", "valid_accuracy"): assert a[k] == pytest.approx(b[k], rel=1e-12)
