"""The compute engine shared by training, the old-feature cache and extraction: the device, mixed
precision, torchrun's processes (``distributed``) and how batches are read (``loader``)."""

from bctkit.engine.compute import Engine
from bctkit.engine.loader import Batch, Feed, epoch_batches, sequential_batches

__all__ = ["Batch", "Engine", "Feed", "epoch_batches", "sequential_batches"]
