"""Training options: arcface_torch's safeguards for margin heads fill only what a config leaves unset."""

import pytest

from bctkit.data import SyntheticSpec, make_synthetic
from bctkit.models import BackboneConfig, HeadConfig
from bctkit.run.config import RunConfig
from bctkit.training import TrainConfig, train_model
from bctkit.training.config import ModelConfig


def _train(head: str, **train) -> TrainConfig:
    return ModelConfig.model_validate({"head": {"type": head}, "train": train}).train


@pytest.mark.parametrize("head", ["arcface", "cosface"])
def test_margin_head_gets_warmup_clip_and_batch_scaled_lr(head):
    t = _train(head, epochs=10, batch_size=256)
    assert t.grad_clip == 5.0
    assert t.schedule.warmup_epochs == 1.0
    assert t.optimizer.lr_batch == 512
    assert t.base_lr == pytest.approx(0.1 * 256 / 512)
    # one epoch whatever the length (so a longer run differs only in epochs); half of a one-epoch run
    assert _train(head, epochs=2).schedule.warmup_epochs == 1.0
    assert _train(head, epochs=1).schedule.warmup_epochs == 0.5


@pytest.mark.parametrize("head", ["softmax", "normface"])
def test_other_heads_keep_the_plain_defaults(head):
    t = _train(head, epochs=10, batch_size=256)
    assert t.grad_clip is None and t.schedule.warmup_epochs == 0 and t.optimizer.lr_batch is None
    assert t.base_lr == 0.1


def test_options_the_config_sets_are_kept_even_null_or_zero():
    t = _train("arcface", epochs=10, batch_size=256, grad_clip=None, optimizer={"lr": 0.05},
               schedule={"name": "poly", "warmup_epochs": 0})
    assert t.grad_clip is None and t.schedule.warmup_epochs == 0
    assert t.optimizer.lr_batch is None and t.base_lr == 0.05
    assert t.schedule.name == "poly"
    # an explicit lr_batch scales an explicit lr
    scaled = _train("arcface", batch_size=64, optimizer={"lr": 0.2, "lr_batch": 128})
    assert scaled.base_lr == pytest.approx(0.1)


def test_run_config_dump_reloads_to_the_same_values():
    """Run keys and `--resume` compare dumps: a filled-in default must survive the round trip."""
    cfg = RunConfig.model_validate({"data": {"dataset": "synthetic"},
                                    "methods": [{"method": "l2", "train": {"epochs": 3}}]})
    assert cfg.new.train.grad_clip == 5.0 and cfg.old.train.optimizer.lr_batch == 512
    assert cfg.methods[0].train.grad_clip == 5.0  # a method's own train section trains the new head
    dumped = cfg.model_dump(mode="json")
    assert RunConfig.model_validate(dumped).model_dump(mode="json") == dumped


def test_trainer_uses_the_batch_scaled_rate():
    data = make_synthetic(SyntheticSpec(num_classes=4, images_per_class=8, size=16, seed=1))
    bb = BackboneConfig(arch="r8", width=4, embedding_dim=8, image_size=16)
    cfg = TrainConfig(epochs=2, batch_size=16, optimizer={"lr": 0.4, "lr_batch": 64},
                      schedule={"name": "constant"})
    result = train_model(data, bb, HeadConfig(type="softmax"), cfg, progress=False)
    assert [h["lr"] for h in result.history] == [pytest.approx(0.1)] * 2
