"""Embedding gallery or query images with a saved model, through the preprocessing it was saved
with (every bctkit model records it), so the images a gallery holds are read as the model expects."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from bctkit.data.sources.base import DataSource
from bctkit.data.transforms import Preprocess
from bctkit.engine.loader import Feed
from bctkit.errors import FileFormatError
from bctkit.features import iter_features
from bctkit.models.store import LoadedModel


def model_feed(model: LoadedModel, source: DataSource, workers: int = 0) -> Feed:
    """``source`` read through ``model``'s saved preprocessing (colour, resize, crop, mean/std)."""
    spec = model.meta.get("preprocessing")
    if not isinstance(spec, dict):
        raise FileFormatError(f"model {model.meta.get('name', '?')} ({model.fingerprint}) records no "
                              "preprocessing; it cannot embed images")
    return Feed(source, Preprocess.from_spec(spec), workers)


def embed_batches(model: LoadedModel, source: DataSource, batch_size: int = 256, progress: bool = True,
                  desc: str = "embed", workers: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices into ``source``, float32 embeddings) batch by batch, in the source's order."""
    if model.backbone is None:
        raise FileFormatError(f"model {model.fingerprint} has no network (known by its features only)")
    feed = model_feed(model, source, workers)
    for first, feats in iter_features(model.backbone, feed, batch_size, progress=progress, desc=desc):
        yield np.arange(first, first + len(feats)), feats.numpy().astype(np.float32, copy=False)


def embed_all(model: LoadedModel, source: DataSource, batch_size: int = 256, progress: bool = True,
              desc: str = "embed") -> np.ndarray:
    """float32 [len(source), d] embeddings of every image of ``source``."""
    parts = [f for _, f in embed_batches(model, source, batch_size, progress, desc)]
    return np.concatenate(parts) if parts else np.zeros((0, model.output_dim), np.float32)


def as_vectors(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """float32 C-ordered rows, as the store takes them."""
    arr = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(arr, dtype=np.float32)
