"""Training: resume equals an uninterrupted run; schedules; NaN loss; frozen old side."""

import json
import math

import numpy as np
import pytest
import torch

from bctkit.data import SyntheticSpec, make_synthetic
from bctkit.engine.loader import Feed
from bctkit.errors import TrainingError
from bctkit.losses import CompatContext, build_term
from bctkit.models import BackboneConfig, HeadConfig
from bctkit.models.store import freeze
from bctkit.training import ScheduleConfig, TrainConfig, lr_factor, train_model

BB = BackboneConfig(arch="r8", width=4, embedding_dim=8, image_size=16, dropout=0.2)
HEAD = HeadConfig(type="arcface", s=16, m=0.2)


@pytest.fixture(scope="module")
def tiny():
    return make_synthetic(SyntheticSpec(num_classes=6, images_per_class=8, size=16, seed=5))


def _cfg(optimizer: str = "sgd", epochs: int = 3) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=16, optimizer={"name": optimizer, "lr": 0.05},
                       schedule={"name": "cosine", "warmup_epochs": 1}, grad_clip=5.0,
                       augment={"hflip": True, "crop_pad": 2})


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_matches_uninterrupted(tmp_path, tiny, optimizer):
    cfg = _cfg(optimizer)
    full = train_model(tiny, BB, HEAD, cfg, progress=False, checkpoint=tmp_path / "a.safetensors")
    ckpt = tmp_path / "b.safetensors"
    first = train_model(tiny, BB, HEAD, cfg, progress=False, checkpoint=ckpt, stop_after_epoch=1)
    assert len(first.history) == 1
    resumed = train_model(tiny, BB, HEAD, cfg, progress=False, checkpoint=ckpt, resume=True)
    assert resumed.resumed_from_epoch == 1 and len(resumed.history) == 3
    _same_weights(full, resumed)
    assert full.history[-1]["loss"] == resumed.history[-1]["loss"]


def _same_weights(a, b):
    for (k, x), y in zip(a.backbone.state_dict().items(), b.backbone.state_dict().values(), strict=True):
        assert torch.equal(x, y), k
    assert torch.equal(a.head.weight, b.head.weight)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_matches_uninterrupted(tmp_path, tiny, workers):
    """Killed inside an epoch after a step checkpoint, a resumed run ends with the same weights, and
    reading through worker processes changes nothing."""
    cfg = _cfg().model_copy(update={"checkpoint_every": 1})
    feed = Feed(tiny, workers=workers)
    full = train_model(tiny, BB, HEAD, _cfg(), progress=False)
    ckpt = tmp_path / "m.safetensors"
    # 48 images / batch 16 = 3 steps per epoch: killed during the 5th step's checkpoint, so the
    # last checkpoint holds epoch 2 after its first step, and the 5th step is trained again
    train_model(feed, BB, HEAD, cfg, progress=False, checkpoint=ckpt, stop_after_step=5)
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    assert (meta["epoch"], meta["step"]) == (1, 1)
    resumed = train_model(feed, BB, HEAD, cfg, progress=False, checkpoint=ckpt, resume=True)
    _same_weights(full, resumed)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_resume_refuses_other_run(tmp_path, tiny):
    ckpt = tmp_path / "c.safetensors"
    train_model(tiny, BB, HEAD, _cfg(), progress=False, checkpoint=ckpt, stop_after_epoch=1, run_id="a")
    with pytest.raises(TrainingError, match="another configuration"):
        train_model(tiny, BB, HEAD, _cfg(), progress=False, checkpoint=ckpt, resume=True, run_id="b")


def test_training_learns(tiny):
    res = train_model(tiny, BB, HEAD, _cfg(epochs=6), progress=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_nan_loss_is_a_clear_error(tiny):
    cfg = TrainConfig(epochs=2, batch_size=16, optimizer={"name": "sgd", "lr": 1e30},
                      schedule={"name": "constant"})
    with pytest.raises(TrainingError, match="loss became"):
        train_model(tiny, BB, HEAD, cfg, progress=False)


def test_old_side_gets_no_gradient(tiny):
    old = train_model(tiny, BB, HEAD, _cfg(epochs=2), progress=False)
    freeze(old.backbone)
    freeze(old.head)
    before = {k: v.clone() for k, v in old.backbone.state_dict().items()}
    labels = torch.from_numpy(tiny.labels)
    ctx = CompatContext(old_embedding_dim=8, new_embedding_dim=8, num_new_classes=6,
                        new_to_old=torch.arange(6), train_labels=labels,
                        old_train_feats=torch.randn(len(tiny), 8), old_model=old.backbone,
                        old_head=old.head)
    train_model(tiny, BB, HEAD, _cfg(epochs=2), term=build_term("l2", {}), ctx=ctx, progress=False)
    for k, v in old.backbone.state_dict().items():
        assert torch.equal(before[k], v), k
    assert all(p.grad is None for p in old.backbone.parameters())


def test_schedules():
    steps, epochs = 10, 4
    mult = ScheduleConfig(name="multistep", milestones=[1, 3], gamma=0.1)
    got = [lr_factor(mult, s, steps, epochs) for s in (0, 9, 10, 29, 30, 39)]
    assert np.allclose(got, [1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = ScheduleConfig(name="cosine", warmup_epochs=1)
    assert math.isclose(lr_factor(cos, 0, steps, epochs), 0.1)
    assert math.isclose(lr_factor(cos, 9, steps, epochs), 1.0)
    assert math.isclose(lr_factor(cos, 10, steps, epochs), 1.0)
    assert math.isclose(lr_factor(cos, 25, steps, epochs), 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    poly = ScheduleConfig(name="poly", power=2)
    assert math.isclose(lr_factor(poly, 20, steps, epochs), (1 - 20 / 40) ** 2)


def test_config_conflicts():
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(epochs=2, schedule={"name": "cosine", "warmup_epochs": 2})
    with pytest.raises(ValueError, match="milestones"):
        TrainConfig(epochs=5, schedule={"name": "multistep", "milestones": [2, 7]})


def test_resume_says_where_it_continues(tmp_path, tiny):
    cfg = _cfg(epochs=2)
    ckpt = tmp_path / "c.safetensors"
    train_model(tiny, BB, HEAD, cfg, progress=False, checkpoint=ckpt, stop_after_epoch=1, run_id="r")
    said: list[str] = []
    train_model(tiny, BB, HEAD, cfg, progress=False, checkpoint=ckpt, resume=True, run_id="r", desc="paragon",
                log=said.append)
    assert said == [f"[paragon] resuming from {ckpt} at epoch 2 of 2"]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_extends_continues_a_finished_run_under_the_longer_schedule(tmp_path, tiny, schedule):
    """A finished 2-epoch run's final checkpoint continued to 3 epochs (``extends``): its epochs are
    kept and the third runs at the 3-epoch schedule's rates; at a constant rate the result is the
    3-epoch run's, under a cosine one it is not."""
    short, long = (_cfg(epochs=e).model_copy(update={"schedule": ScheduleConfig(name=schedule)})
                   for e in (2, 3))
    ckpt = tmp_path / "c.safetensors"
    done = train_model(tiny, BB, HEAD, short, progress=False, checkpoint=ckpt, run_id="two")
    with pytest.raises(TrainingError, match="another configuration"):
        train_model(tiny, BB, HEAD, long, progress=False, checkpoint=ckpt, resume=True, run_id="three")
    more = train_model(tiny, BB, HEAD, long, progress=False, checkpoint=ckpt, resume=True, run_id="three",
                       extends="two")
    assert more.resumed_from_epoch == 2 and len(more.history) == 3 and more.history[:2] == done.history
    assert json.loads(ckpt.with_suffix(".json").read_text())["run_id"] == "three"
    steps = 3  # 48 images / batch 16
    assert more.history[2]["lr"] == pytest.approx(0.05 * lr_factor(long.schedule, 3 * steps - 1, steps, 3))
    scratch = train_model(tiny, BB, HEAD, long, progress=False)
    if schedule == "constant":
        _same_weights(scratch, more)
    else:
        assert not torch.equal(scratch.head.weight, more.head.weight)
