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
from bctkit.errors import ConfigError
from bctkit.extract.model import ExtractModel, check_input, from_loaded, open_model
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


def check_images(model: Embedder, source: DataSource) -> None:
    """Refuse images that do not fit ``model`` (channels or size, through its preprocessing) with
    a one-line :class:`~bctkit.errors.DataError` naming the image, before anything is embedded
    (``bctkit extract``'s check); every gallery path (add, search, backfill) embeds through it."""
    m = as_embedder(model)
    _check(m, Feed(source, m.preprocess))


def embed_batches(model: Embedder, source: DataSource, batch_size: int = 256, progress: bool = True,
                  desc: str = "embed", workers: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row indices into ``source``, float32 embeddings) batch by batch, in the source's order;
    images that do not fit the model are refused first (see :func:`check_images`)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"{desc}: batch size must be >= 1, got {batch_size!r}")
    m = as_embedder(model)
    feed = Feed(source, m.preprocess, workers)
    _check(m, feed)
    for first, feats in iter_features(m.net, feed, batch_size, progress=progress, desc=desc):
        yield np.arange(first, first + len(feats)), feats.numpy().astype(np.float32, copy=False)


def _check(m: ExtractModel, feed: Feed) -> None:
    """extract's input check, the model named by its file, else its name and fingerprint."""
    if len(feed):
        where = m.meta.get("model_file") or f"model {m.meta.get('model')} ({m.meta.get('model_fingerprint')})"
        check_input(m, feed, str(where))


def embed_all(model: Embedder, source: DataSource, batch_size: int = 256, progress: bool = True,
              desc: str = "embed") -> np.ndarray:
    """float32 [len(source), d] embeddings of every image of ``source``."""
    m = as_embedder(model)
    parts = [f for _, f in embed_batches(m, source, batch_size, progress, desc)]
    return np.concatenate(parts) if parts else np.zeros((0, m.dim), np.float32)
