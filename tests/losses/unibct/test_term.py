"""UniBCT term: schedule, prototype modes, loss formula, warm-up, resume with rebuilt prototypes."""

import math

import pytest
import torch

from bctkit.data import SyntheticSpec, make_synthetic
from bctkit.errors import ConfigError
from bctkit.losses import CompatBatch, CompatContext, build_term
from bctkit.losses.unibct.prototypes import class_means
from bctkit.losses.unibct.refinement import refine_prototypes, refinement_weights, weight_summary
from bctkit.models import BackboneConfig, HeadConfig, build_backbone
from bctkit.run.config import load_config, packaged_config
from bctkit.training import TrainConfig, train_model

BB = BackboneConfig(arch="r8", width=4, embedding_dim=8, image_size=16)


@pytest.fixture(scope="module")
def tiny():
    return make_synthetic(SyntheticSpec(num_classes=5, images_per_class=6, size=16, seed=2))


def _ctx(tiny, old_feats):
    labels = torch.from_numpy(tiny.labels)
    return CompatContext(old_embedding_dim=8, new_embedding_dim=8, num_new_classes=5,
                         new_to_old=torch.arange(5), train_labels=labels, old_train_feats=old_feats,
                         train_images=tiny.images)


def test_rebuild_schedule():
    term = build_term("unibct", {"warmup_epochs": 10, "rebuild_every": 10})
    assert [e for e in range(35) if term.rebuild_at(e)] == [10, 20, 30]
    paper = build_term("unibct", {"warmup_epochs": 10, "rebuild_epochs": [10, 20]})
    assert [e for e in range(35) if paper.rebuild_at(e)] == [10, 20]
    with pytest.raises(ConfigError, match="warmup_epochs"):
        term.check_train(10)
    with pytest.raises(ConfigError, match="rebuild_epochs"):
        paper.check_train(15)


def test_avg_loss_matches_formula_and_warmup(tiny):
    torch.manual_seed(0)
    old = torch.randn(len(tiny), 8)
    term = build_term("unibct", {"prototypes": "avg", "warmup_epochs": 1, "s": 16, "m": 0.3, "eta": 0.5})
    term.setup(_ctx(tiny, old))
    model = build_backbone(BB)
    term.on_epoch_start(0, model)
    f = torch.randn(len(tiny), 8, requires_grad=True)
    y = torch.from_numpy(tiny.labels)
    batch = CompatBatch(new_feats=f, labels=y, index=torch.arange(len(y)), epoch=0)
    assert term(batch).loss.item() == 0.0
    term.on_epoch_start(1, model)
    protos = class_means(old, y, 5)
    assert torch.allclose(term.head.weight, protos)
    cos = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(protos, dim=1).T
    theta = torch.acos(cos.gather(1, y[:, None]).clamp(-1, 1))
    logits = 16 * cos.scatter(1, y[:, None], torch.cos(theta + 0.3))
    want = 0.5 * torch.nn.functional.cross_entropy(logits, y)
    batch.epoch = 1
    out = term(batch)
    assert math.isclose(out.loss.item(), want.item(), rel_tol=1e-5)
    out.loss.backward()
    assert f.grad is not None and term.head.weight.grad is None


def test_refined_follows_the_new_model(tiny):
    torch.manual_seed(1)
    old = torch.randn(len(tiny), 8)
    term = build_term("unibct", {"warmup_epochs": 0, "rebuild_every": 1})
    term.setup(_ctx(tiny, old))
    y = torch.from_numpy(tiny.labels)
    model = build_backbone(BB).eval()
    term.on_epoch_start(0, model)
    with torch.no_grad():
        new = model(torch.from_numpy(tiny.images).float() / 127.5 - 1)
    assert torch.allclose(term.head.weight, refine_prototypes(old, new, y, 5), atol=1e-5)
    assert not torch.allclose(term.head.weight, class_means(old, y, 5), atol=1e-4)
    stats = weight_summary(refinement_weights(new, y, 5), y, 5)
    assert term.weight_stats == pytest.approx(stats, abs=1e-6) and 0 < stats["ess"] < 1
    parts = term(CompatBatch(new_feats=new, labels=y, index=torch.arange(len(y)), epoch=0)).parts
    assert parts["proto_ess"] == term.weight_stats["ess"] and parts["proto_low"] == term.weight_stats["low"]
    first = term.head.weight.clone()
    with torch.no_grad():
        model.fc.weight.mul_(-1.5)
    term.on_epoch_start(1, model)
    assert not torch.allclose(first, term.head.weight)


def test_resume_with_unibct(tmp_path, tiny):
    old = torch.randn(len(tiny), 8, generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(epochs=3, batch_size=10, schedule={"name": "constant"}, optimizer={"lr": 0.05})
    params = {"warmup_epochs": 1, "rebuild_every": 1}

    def run(**kw):
        return train_model(tiny, BB, HeadConfig(s=16, m=0.2), cfg, term=build_term("unibct", params),
                           ctx=_ctx(tiny, old), progress=False, **kw)

    full = run()
    ckpt = tmp_path / "u.safetensors"
    run(checkpoint=ckpt, stop_after_epoch=2)
    resumed = run(checkpoint=ckpt, resume=True)
    for a, b in zip(full.backbone.state_dict().values(), resumed.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert full.history[-1]["proto_ce"] == resumed.history[-1]["proto_ce"]


def test_config_conflict_at_load_time():
    with pytest.raises(ConfigError, match="warmup_epochs"):
        load_config(packaged_config("demo-quick"),
                    ["methods=[{method: unibct, params: {warmup_epochs: 50}}]"])
