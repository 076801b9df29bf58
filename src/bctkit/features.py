"""Feature extraction and feature files (safetensors: ``feats``, ``labels`` + JSON metadata).

Feature files are what ``bctkit evaluate`` reads, so they carry everything needed to compare them:
the model fingerprint, which leading coordinates are the compatible embedding, and the dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bctkit.data.sources.base import DataSource
from bctkit.engine.loader import Feed, as_feed, sequential_batches
from bctkit.errors import DataError, FileFormatError
from bctkit.storage import load_tensors, save_tensors


def iter_features(
    model: nn.Module,
    data: Feed | DataSource | np.ndarray,
    batch_size: int = 512,
    flip: bool = False,
    progress: bool = True,
    desc: str = "extract",
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 features) of each batch of ``data`` in order, under inference mode.

    ``flip``: add the feature of the horizontally flipped image (the flip test). Raises DataError
    when the model produces NaN or Inf.
    """
    feed = as_feed(data)
    n = len(feed)
    if n == 0:
        raise DataError(f"{desc}: no images to extract")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=n, desc=desc, disable=not progress, leave=False,
                                          unit="img") as bar:
            for images, _, idx in feed.read(sequential_batches(n, batch_size)):
                x = feed.preprocess.normalize(images)
                f = model(x)
                if flip:
                    f = f + model(x.flip(3))
                f = f.float()
                if not torch.isfinite(f).all():
                    raise DataError(f"{desc}: the model produced NaN or Inf features "
                                    f"(rows from {int(idx[0])})")
                yield int(idx[0]), f
                bar.update(len(idx))
    finally:
        model.train(was_training)


def extract(
    model: nn.Module,
    data: Feed | DataSource | np.ndarray,
    batch_size: int = 512,
    flip: bool = False,
    progress: bool = True,
    desc: str = "extract",
) -> torch.Tensor:
    """Embed every image of ``data`` (a :class:`~bctkit.engine.loader.Feed`, a source, or uint8
    images [N, C, H, W]) in batches: float32 [N, d]; see :func:`iter_features`."""
    return torch.cat([f for _, f in iter_features(model, data, batch_size, flip, progress, desc)])


@dataclass
class FeatureSet:
    """Features of one model on one image set. ``compat_dims``: leading coordinates that form the
    embedding compatible with the model's predecessor (None: all of them); ``compat_prefixes``
    (meta) every leading block compatible with some ancestor, for chains of upgrades."""

    feats: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.feats.shape[1])

    @property
    def compat_dims(self) -> int | None:
        v = self.meta.get("compat_dims")
        return None if v is None else int(v)

    @property
    def compat_prefixes(self) -> list[int]:
        """Sizes of the leading blocks compatible with an ancestor model (largest first)."""
        v = self.meta.get("compat_prefixes")
        if v is not None:
            return [int(p) for p in v]
        return [] if self.compat_dims is None else [self.compat_dims]

    def save(self, path: Path) -> None:
        save_tensors(path, {"feats": self.feats, "labels": self.labels}, self.meta)


def load_features(path: Path) -> FeatureSet:
    """Read a feature file, checking it is complete and usable."""
    tensors, meta = load_tensors(path)
    if "feats" not in tensors or "labels" not in tensors:
        raise FileFormatError(f"{path}: feature file needs tensors 'feats' and 'labels'")
    feats, labels = tensors["feats"].float(), tensors["labels"].long()
    if feats.ndim != 2 or labels.ndim != 1 or len(feats) != len(labels):
        raise FileFormatError(
            f"{path}: expected feats [N, d] and labels [N], got {list(feats.shape)} and {list(labels.shape)}"
        )
    if not torch.isfinite(feats).all():
        raise DataError(f"{path}: feats contain NaN or Inf")
    return FeatureSet(feats, labels, meta)
