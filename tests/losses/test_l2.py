"""The compatibility-term interface, independent and l2 against direct formulas."""

import pytest
import torch

from bctkit.errors import ConfigError
from bctkit.losses import CompatBatch, available_methods, build_term


def _batch(f: torch.Tensor, o: torch.Tensor) -> CompatBatch:
    return CompatBatch(new_feats=f, labels=torch.zeros(len(f), dtype=torch.long),
                       index=torch.arange(len(f)), epoch=0, old_feats=o)


def test_registry():
    assert {"independent", "l2"} <= set(available_methods())
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        build_term("nope", {})
    with pytest.raises(ConfigError, match="threshold"):
        build_term("l2", {"threshold": -1})


def test_l2_plain_weakened_and_squared():
    torch.manual_seed(0)
    f, o = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5)
    fn, on = f / f.norm(dim=1, keepdim=True), o / o.norm(dim=1, keepdim=True)
    dist = (fn - on).norm(dim=1)
    plain = build_term("l2", {})(_batch(f, o))
    assert torch.allclose(plain.loss, 10 * dist.mean())
    weak = build_term("l2", {"threshold": 0.2, "weight": 3})(_batch(f, o))
    assert torch.allclose(weak.loss, 3 * (dist - 0.2).clamp_min(0).mean())
    aml = build_term("l2", {"squared": True, "normalize": False, "weight": 1})(_batch(f, o))
    assert torch.allclose(aml.loss, ((f - o) ** 2).sum(1).mean())
    plain.loss.backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_l2_uses_leading_dims_when_wider():
    term = build_term("l2", {"normalize": False, "squared": True, "weight": 1})
    f, o = torch.randn(4, 7), torch.randn(4, 5)
    assert torch.allclose(term(_batch(f, o)).loss, ((f[:, :5] - o) ** 2).sum(1).mean())
    assert term.compatible_dims(5, 7) == 5 and term.compatible_dims(5, 5) is None
    with pytest.raises(ConfigError, match="embedding_dim"):
        term.check_dims(8, 4)


def test_independent_is_zero():
    out = build_term("independent", {})(_batch(torch.randn(3, 4), torch.randn(3, 4)))
    assert out.loss.item() == 0.0
