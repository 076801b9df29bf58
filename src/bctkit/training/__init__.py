"""Training: optimisers, schedules, checkpoints and the shared training loop."""

from bctkit.training.config import AugmentConfig, OptimizerConfig, ScheduleConfig, TrainConfig
from bctkit.training.schedules import lr_factor
from bctkit.training.trainer import TrainResult, train_model

__all__ = [
    "AugmentConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainResult",
    "lr_factor",
    "train_model",
]
