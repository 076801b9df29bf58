"""Embedding gallery or query images with a model, through the preprocessing it carries (a bctkit
model's saved spec, or an export's card), so the images a gallery holds are read as the model
expects. A gallery version is the model's fingerprint: an export and the bctkit model it was made
from are the same version."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bctkit.data.sources.base import DataSource
from bctkit.engine.loader import Feed
from bctkit.extract.model import ExtractModel, from_loaded, open_model
from bctkit.features import iter_features
from bctkit.models.store import LoadedModel

Embedder = ExtractModel | LoadedModel
"""What the gallery embeds with: an opened model (:func:`bctkit.extract.open_model`) or a loaded one."""


def open_embedder(path: str | Path) -> ExtractModel:
    """The model at ``path`` on the CPU: a bctkit model (file or its folder) or a ``bctkit export``
    folder or file (TorchScript, ONNX, weights, with its card)."""
    return open_model(path, torch.device("cpu"))


def as_embedder(model: Embedder) -> ExtractModel:
    """``model`` as an :class:`ExtractModel` (a loaded bctkit model is wrapped, not copied)."""
    if isinstance(model, ExtractModel):
        return model
    return from_loaded(model, f"model {model.meta.get('name', '?')} ({model.fingerprint})")


def version_of(model: ExtractModel) -> tuple[str, int, str | None, dict | None]:
    """(fingerprint, dim, name, BT^2 layout): how the model is declared as a gallery version."""
    return str(model.meta["model_fingerprint"]), model.dim, model.meta.get("model"), model.meta.get("layout")


def embed_batches(model: Embedder, source: DataSource, batch_size: int = 256, progress: bool = True,
                  desc: str = "embed", workers: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices into ``source``, float32 embeddings) batch by batch, in the source's order."""
    m = as_embedder(model)
    feed = Feed(source, m.preprocess, workers)
    for first, feats in iter_features(m.net, feed, batch_size, progress=progress, desc=desc):
        yield np.arange(first, first + len(feats)), feats.numpy().astype(np.float32, copy=False)


def embed_all(model: Embedder, source: DataSource, batch_size: int = 256, progress: bool = True,
              desc: str = "embed") -> np.ndarray:
    """float32 [len(source), d] embeddings of every image of ``source``."""
    m = as_embedder(model)
    parts = [f for _, f in embed_batches(m, source, batch_size, progress, desc)]
    return np.concatenate(parts) if parts else np.zeros((0, m.dim), np.float32)
