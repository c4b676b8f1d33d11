"""Transformer distillation (chapter 12): attention, layer map and losses against reference formulas; the recipe trains."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgekd.core import ConfigError, ShapeError, set_seed
from edgekd.data import from_tensors
from edgekd.experiment import run_experiment
from edgekd.learner import Learner
from edgekd.losses import FeatureHooks
from edgekd.transformer_kd import (AttentionMapLoss, HiddenStateLoss, SelfAttention, TinyTransformer, attention_maps,
                                   transformer_distill_cb, transformer_pairs, uniform_layer_map)

torch.set_num_threads(1)


def test_attention_matches_scaled_dot_product_attention():
    set_seed(0)
    att, x = SelfAttention(12, 3), torch.randn(2, 7, 12)
    h = FeatureHooks(att, ["probs"], detach=True)
    out = att(x); probs = h["probs"]; h.remove()
    q, k, v = att.qkv(x).reshape(2, 7, 3, 3, 4).permute(2, 0, 3, 1, 4)
    ref = att.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 7, 12))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    # the probabilities are softmax(q k^T / sqrt(d_h)), computed by hand
    s = q.detach().double().numpy() @ np.swapaxes(k.detach().double().numpy(), -1, -2) / 2.0
    p = np.exp(s - s.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs.double().numpy(), p, atol=1e-6)


def test_uniform_layer_map():
    assert uniform_layer_map(4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert uniform_layer_map(3, 8) == [(1, 2), (2, 5), (3, 8)]   # m N / M, integer division
    with pytest.raises(ConfigError, match="must not be deeper than the teacher"): uniform_layer_map(5, 4)
    s, t = TinyTransformer(dim=8, depth=2), TinyTransformer(dim=16, depth=6)
    assert transformer_pairs(s, t, "attention") == [("blocks.0.attn.scores", "blocks.2.attn.scores"), ("blocks.1.attn.scores", "blocks.5.attn.scores")]


def test_hidden_state_loss_against_reference():
    torch.manual_seed(0)
    hs, ht = torch.randn(3, 5, 6), torch.randn(3, 5, 10)
    loss = HiddenStateLoss()
    v = loss(None, None, [hs], [ht]).item()
    W, b = loss.proj[0].weight.detach().double().numpy(), loss.proj[0].bias.detach().double().numpy()
    ref = np.mean([(W @ hs[i, j].double().numpy() + b - ht[i, j].double().numpy()) ** 2 for i in range(3) for j in range(5)])
    assert abs(v - ref) < 1e-6
    same = torch.randn(3, 5, 10)
    c = HiddenStateLoss("cosine")(None, None, [same], [ht]).item()
    cos = [np.dot(same[i, j].numpy(), ht[i, j].numpy()) / (np.linalg.norm(same[i, j].numpy()) * np.linalg.norm(ht[i, j].numpy()))
           for i in range(3) for j in range(5)]
    assert abs(c - np.mean([1 - x for x in cos])) < 1e-5
    with pytest.raises(ShapeError, match="equal token counts"): HiddenStateLoss()(None, None, [torch.randn(3, 4, 6)], [ht])


def test_attention_map_loss_against_reference():
    torch.manual_seed(1)
    a, b = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    ref = np.mean([np.mean((a[:, i].numpy() - b[:, i].numpy()) ** 2) for i in range(4)])
    assert abs(AttentionMapLoss()(None, None, [a], [b]).item() - ref) < 1e-6
    with pytest.raises(ShapeError, match="same heads"): AttentionMapLoss()(None, None, [a[:, :2]], [b])


def test_recipe_trains_and_leaves_teacher_alone():
    set_seed(0)
    x, y = torch.randn(64, 1, 40), torch.randint(0, 10, (64,))
    dls = from_tensors(x, y, x[:32], y[:32], batch_size=16, seed=0, classes=[str(i) for i in range(10)])
    teacher, student = TinyTransformer(dim=16, depth=4).eval(), TinyTransformer(dim=8, depth=2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cb = transformer_distill_cb(student, teacher, "inter", beta=0.5)
    learn = Learner(student, dls, lr=1e-3, cbs=[cb], progress=False)
    learn.fit(1)
    assert {"loss_ce", "loss_kd", "loss_emb", "loss_hid", "loss_att"} <= set(learn.history[-1])
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    maps = attention_maps(student, x[:3])
    assert set(maps) == {0, 1} and maps[1].shape == (3, 2, 10, 10)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(3, 2, 10))


def test_experiment_fast_run():
    res = run_experiment("transformer_kd", seeds=[0, 1], fast=True, progress=False, betas=(1.0,))
    assert sorted({r["variant"] for r in res.runs}) == ["inter beta=1", "pred", "scratch", "teacher"]
    assert res.summary["beta_chosen_on_valid"] == 1.0
    with pytest.raises(ConfigError, match="beta must be >= 0"):
        run_experiment("transformer_kd", seeds=[0], fast=True, progress=False, betas=(-1.0,))
