"""The compute engine shared by training, the old-feature cache and extraction: how batches are read
(DataLoader workers, seeded order)."""

from bctkit.engine.loader import Batch, Feed, epoch_batches, sequential_batches

__all__ = ["Batch", "Feed", "epoch_batches", "sequential_batches"]
