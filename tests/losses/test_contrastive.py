"""``contrastive``: UniBCT Eq. 12 InfoNCE against an explicit loop."""

import math

import pytest
import torch

import bctkit.losses.contrastive  # noqa: F401  (registers "contrastive")
from bctkit.errors import ConfigError
from bctkit.losses.base import CompatBatch, build_term


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def _manual(f: torch.Tensor, o: torch.Tensor, y: list[int], tau: float) -> float:
    d_o = o.shape[1]
    total = 0.0
    for i in range(len(y)):
        a = _unit(f[i, :d_o].tolist())
        sims = [sum(p * q for p, q in zip(a, _unit(o[j].tolist()), strict=True)) / tau for j in range(len(y))]
        denom = math.exp(sims[i]) + sum(math.exp(sims[j]) for j in range(len(y)) if y[j] != y[i])
        total += -math.log(math.exp(sims[i]) / denom)
    return total / len(y)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_contrastive_matches_loop(tau):
    torch.manual_seed(0)
    y = [0, 1, 0, 2, 1, 3]
    f = torch.randn(len(y), 7, requires_grad=True)
    o = torch.randn(len(y), 5)
    term = build_term("contrastive", {"tau": tau, "weight": 3.0})
    batch = CompatBatch(new_feats=f, labels=torch.tensor(y), index=torch.arange(len(y)), epoch=0, old_feats=o)
    out = term(batch)
    assert out.loss.item() == pytest.approx(3.0 * _manual(f.detach(), o, y, tau), rel=1e-4)
    out.loss.backward()
    assert f.grad[:, :5].abs().sum() > 0 and f.grad[:, 5:].abs().sum() == 0


def test_contrastive_single_class_batch_is_zero_and_aligned_is_small():
    f = torch.randn(4, 5)
    batch = CompatBatch(new_feats=f, labels=torch.zeros(4, dtype=torch.long), index=torch.arange(4),
                        epoch=0, old_feats=torch.randn(4, 5))
    assert build_term("contrastive", {})(batch).loss.item() == pytest.approx(0.0, abs=1e-6)
    o = torch.eye(4, 5)
    aligned = CompatBatch(new_feats=o.clone(), labels=torch.arange(4), index=torch.arange(4), epoch=0,
                          old_feats=o)
    assert build_term("contrastive", {})(aligned).loss.item() < 1e-5


def test_contrastive_options_and_dims():
    term = build_term("contrastive", {})
    assert term.params.tau == 0.07 and term.params.weight == 1.0
    assert term.compatible_dims(4, 6) == 4 and term.compatible_dims(4, 4) is None
    with pytest.raises(ConfigError, match="embedding_dim"):
        term.check_dims(8, 4)
    with pytest.raises(ConfigError, match="tau"):
        build_term("contrastive", {"tau": 0})
    with pytest.raises(ConfigError, match="old features"):
        term(CompatBatch(new_feats=torch.randn(2, 4), labels=torch.arange(2), index=torch.arange(2), epoch=0))
