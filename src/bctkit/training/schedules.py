"""Learning-rate factor as a pure function of the step, so resuming needs no scheduler state."""

from __future__ import annotations

import bisect
import math

from bctkit.training.config import ScheduleConfig


def lr_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate at optimisation step ``step`` (0-based)."""
    total = steps_per_epoch * epochs
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return (step + 1) / warm
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "multistep":
        return cfg.gamma ** bisect.bisect_right(cfg.milestones, step // steps_per_epoch)
    t = (step - warm) / max(1, total - warm)
    if cfg.name == "cosine":
        return cfg.min_factor + (1 - cfg.min_factor) * 0.5 * (1 + math.cos(math.pi * t))
    return max(0.0, 1.0 - t) ** cfg.power
