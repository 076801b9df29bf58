"""Checks a run makes before anything trains: every device exists, every backbone takes the
images its data gives."""

from __future__ import annotations

from bctkit.engine.device import resolve_device
from bctkit.engine.distributed import launched_world, local_rank
from bctkit.errors import ConfigError
from bctkit.run.config import RunConfig


def check_devices(cfg: RunConfig) -> None:
    """Every model's ``train.device`` exists on this machine, checked before anything runs."""
    sides = [("old.train", cfg.old.train), ("new.train", cfg.new.train)]
    sides += [(f"methods.{i}.train", m.train) for i, m in enumerate(cfg.methods) if m.train is not None]
    sides += [(f"chain.{i}.train", v.train) for i, v in enumerate(cfg.chain) if v.train is not None]
    for side, train in sides:
        resolve_device(train.device, local_rank(), launched_world(), field=f"{side}.device")


def check_inputs(cfg: RunConfig, shape: tuple[int, int, int], sides: tuple[str, ...] = ("old", "new")
                 ) -> None:
    """Every backbone of the run (of ``sides``, and the chain's) takes images of the data's
    [C, H, W], checked before training."""
    named = [(side, getattr(cfg, side).backbone) for side in sides]
    named += [(f"chain.{i}", v.backbone) for i, v in enumerate(cfg.chain) if v.backbone is not None]
    for side, bb in named:
        if tuple(bb.input_shape) != tuple(shape):
            c, h, w = shape
            raise ConfigError(
                f"{side}.backbone takes {'x'.join(map(str, bb.input_shape))} images (C x H x W) "
                f"but the data gives {c}x{h}x{w}; set data.transform (resize, crop, color) or "
                f"{side}.backbone.in_channels / image_size"
            )
