"""``lwf``: KL to the old model's soft labels through a trainable copy of the old classifier."""

import math

import pytest
import torch

import bctkit.losses.bct  # noqa: F401  (registers "bct")
import bctkit.losses.lwf  # noqa: F401  (registers "lwf")
from bctkit.data import SyntheticSpec, make_synthetic
from bctkit.errors import ConfigError
from bctkit.features import extract
from bctkit.losses.base import CompatBatch, CompatContext, build_term
from bctkit.models import BackboneConfig, HeadConfig
from bctkit.models.heads import CosFaceHead, SoftmaxHead
from bctkit.models.store import freeze
from bctkit.training import TrainConfig, train_model


def _ctx(head, d_o: int = 4) -> CompatContext:
    return CompatContext(old_embedding_dim=d_o, new_embedding_dim=6, num_new_classes=3,
                         new_to_old=torch.arange(3), train_labels=torch.arange(3), old_head=head)


def _soft(z: list[float]) -> list[float]:
    m = sum(math.exp(v) for v in z)
    return [math.exp(v) / m for v in z]


@pytest.mark.parametrize("kind", ["softmax", "cosface"])
def test_lwf_matches_formula_and_trains_its_copy(kind):
    torch.manual_seed(0)
    head = SoftmaxHead(4, 3) if kind == "softmax" else CosFaceHead(4, 3, s=5.0, m=0.3)
    with torch.no_grad():
        head.weight.normal_()
    freeze(head)
    before = head.weight.detach().clone()
    term = build_term("lwf", {"weight": 2.0, "temperature": 2.0 if kind == "softmax" else None})
    term.setup(_ctx(head))
    t = 2.0 if kind == "softmax" else 5.0
    assert term.temperature == t
    names = {n for n, _ in term.named_parameters()}
    assert names == ({"student.weight", "student.bias"} if kind == "softmax" else {"student.weight"})
    assert set(term.state_dict()) == names
    assert torch.equal(term.student.weight, head.weight)

    f = torch.randn(5, 6, requires_grad=True)
    o = torch.randn(5, 4)
    batch = CompatBatch(new_feats=f, labels=torch.zeros(5, dtype=torch.long), index=torch.arange(5),
                        epoch=0, old_feats=o)
    w = head.weight.tolist()
    b = head.bias.tolist() if kind == "softmax" else [0.0] * 3

    def z(x: list[float], j: int) -> float:
        dot = sum(p * q for p, q in zip(x, w[j], strict=True))
        if kind == "softmax":
            return dot + b[j]
        return 5.0 * dot / math.sqrt(sum(p * p for p in x) * sum(q * q for q in w[j]))

    total = 0.0
    for i in range(5):
        p = _soft([z(o[i].tolist(), j) / t for j in range(3)])
        q = _soft([z(f[i, :4].tolist(), j) / t for j in range(3)])
        total += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q, strict=True))
    out = term(batch)
    assert out.loss.item() == pytest.approx(2.0 * total / 5, rel=1e-4)

    opt = torch.optim.SGD([f, *term.parameters()], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        term(batch).loss.backward()
        opt.step()
    assert head.weight.grad is None and torch.equal(head.weight, before)
    assert not torch.equal(term.student.weight, before)
    assert term(batch).loss.item() < out.loss.item()


def test_lwf_needs_old_head_and_dims():
    term = build_term("lwf", {})
    with pytest.raises(ConfigError, match="old_head"):
        term.setup(_ctx(None))
    assert term.compatible_dims(4, 6) == 4
    with pytest.raises(ConfigError, match="embedding_dim"):
        term.check_dims(8, 4)


@pytest.mark.parametrize("method", ["lwf", "bct"])
def test_trainer_runs_checkpoints_and_resumes(tmp_path, method):
    data = make_synthetic(SyntheticSpec(num_classes=4, images_per_class=8, size=16, seed=3))
    bb_old = BackboneConfig(arch="r8", width=4, embedding_dim=6, image_size=16)
    bb_new = BackboneConfig(arch="r8", width=4, embedding_dim=8, image_size=16)
    head_cfg = HeadConfig(type="arcface", s=16, m=0.2)
    cfg = TrainConfig(epochs=2, batch_size=16, optimizer={"name": "sgd", "lr": 0.05})
    old = train_model(data, bb_old, head_cfg, TrainConfig(epochs=1, batch_size=16), progress=False)
    freeze(old.backbone)
    freeze(old.head)
    head_before = old.head.weight.detach().clone()
    backbone_before = {k: v.clone() for k, v in old.backbone.state_dict().items()}
    labels = torch.from_numpy(data.labels)

    def ctx() -> CompatContext:
        return CompatContext(
            old_embedding_dim=6, new_embedding_dim=8, num_new_classes=4,
            new_to_old=torch.tensor([0, 1, -1, 3]), train_labels=labels,
            old_train_feats=extract(old.backbone, data.images, progress=False),
            old_model=old.backbone, old_head=old.head,
        )

    ckpt = tmp_path / "ckpt.safetensors"
    full = train_model(data, bb_new, head_cfg, cfg, term=build_term(method, {}), ctx=ctx(), progress=False)
    train_model(data, bb_new, head_cfg, cfg, term=build_term(method, {}), ctx=ctx(), progress=False,
                checkpoint=ckpt, stop_after_epoch=1)
    resumed = train_model(data, bb_new, head_cfg, cfg, term=build_term(method, {}), ctx=ctx(),
                          progress=False, checkpoint=ckpt, resume=True)
    assert resumed.resumed_from_epoch == 1
    assert full.history[-1]["loss"] == resumed.history[-1]["loss"]
    assert torch.equal(old.head.weight, head_before) and old.head.weight.grad is None
    for k, v in old.backbone.state_dict().items():
        assert torch.equal(backbone_before[k], v), k
    assert all(p.grad is None for p in old.backbone.parameters())
