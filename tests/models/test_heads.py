"""Heads against the formulas of methods.md, including ArcFace's fallback branch."""

import math

import torch

from bctkit.models.heads import HeadConfig, build_head


def _direct_cos(f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.empty(f.shape[0], w.shape[0], dtype=torch.float64)
    for i in range(f.shape[0]):
        for j in range(w.shape[0]):
            a, b = f[i].double(), w[j].double()
            out[i, j] = (a @ b) / (a.norm() * b.norm())
    return out


def test_arcface_logits_match_formula_both_branches():
    torch.manual_seed(0)
    head = build_head(HeadConfig(type="arcface", s=64, m=0.5), 8, 5)
    f = torch.randn(40, 8)
    f[0] = -head.weight[2].detach() + 0.01 * torch.randn(8)  # theta_y near pi: fallback branch
    y = torch.randint(0, 5, (40,))
    y[0] = 2
    got = head.logits(f, y).double()
    cos = _direct_cos(f, head.weight.detach())
    s, m = 64.0, 0.5
    fallback_seen = False
    for i in range(40):
        for j in range(5):
            c = cos[i, j].item()
            if j != y[i]:
                want = s * c
            elif c > math.cos(math.pi - m):
                want = s * math.cos(math.acos(c) + m)
            else:
                fallback_seen = True
                want = s * (c - m * math.sin(math.pi - m))
            assert abs(got[i, j].item() - want) < 1e-3, (i, j)
    assert fallback_seen
    assert torch.allclose(head.logits(f).double(), s * cos, atol=1e-3)


def test_cosface_and_normface_logits():
    torch.manual_seed(1)
    f, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    cf = build_head(HeadConfig(type="cosface", s=30, m=0.4), 6, 4)
    cos = _direct_cos(f, cf.weight.detach())
    want = 30 * (cos - 0.4 * torch.nn.functional.one_hot(y, 4).double())
    assert torch.allclose(cf.logits(f, y).double(), want, atol=1e-4)
    nf = build_head(HeadConfig(type="normface"), 6, 4)
    assert torch.allclose(nf.logits(f, y).double(), 64 * _direct_cos(f, nf.weight.detach()), atol=1e-3)


def test_softmax_head_and_loss():
    torch.manual_seed(2)
    head = build_head(HeadConfig(type="softmax"), 6, 4)
    f, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    logits = f @ head.weight.T + head.bias
    assert torch.allclose(head.logits(f, y), logits)
    assert torch.allclose(head(f, y), torch.nn.functional.cross_entropy(logits, y))


def test_defaults():
    assert HeadConfig(type="arcface").resolved() == (64.0, 0.5)
    assert HeadConfig(type="cosface").resolved() == (64.0, 0.4)
