"""Feature extraction and feature files (safetensors: ``feats``, ``labels`` + JSON metadata).

Feature files are what ``bctkit evaluate`` reads, so they carry everything needed to compare them:
the model fingerprint, which leading coordinates are the compatible embedding, and the dataset.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bctkit.data.sources.base import DataSource, PathTable
from bctkit.engine.distributed import all_gather_rows, is_main, share
from bctkit.engine.loader import Batch, Feed, as_feed, sequential_batches
from bctkit.errors import DataError, FileFormatError
from bctkit.storage import load_tensors, save_tensors

if TYPE_CHECKING:
    from bctkit.engine.compute import Engine


def iter_features(
    model: nn.Module,
    data: Feed | DataSource | np.ndarray,
    batch_size: int = 512,
    flip: bool = False,
    progress: bool = True,
    desc: str = "extract",
    engine: Engine | None = None,
    rows: tuple[int, int] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 CPU features) of each batch of ``data`` in order, under inference mode.

    ``flip``: add the feature of the horizontally flipped image (the flip test). ``engine``: device
    and precision (default: the model's device, float32). ``rows``: only rows [start, end) (one
    rank's share). Raises DataError when the model produces NaN or Inf.
    """
    feed = as_feed(data)
    n = len(feed)
    if n == 0:
        raise DataError(f"{desc}: no images to extract")
    start, end = (0, n) if rows is None else rows
    dev = engine.device if engine is not None else _model_device(model)
    autocast = engine.precision.autocast if engine is not None else contextlib.nullcontext
    batches = [Batch(0, b.step, b.indices + start) for b in sequential_batches(end - start, batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=end - start, desc=desc, disable=not progress, leave=False,
                                          unit="img") as bar:
            for images, _, idx in feed.read(batches):
                x = feed.preprocess.normalize(images.to(dev, non_blocking=True))
                with autocast():
                    f = model(x)
                    if flip:
                        f = f + model(x.flip(3))
                f = f.float().cpu()
                if not torch.isfinite(f).all():
                    raise DataError(f"{desc}: the model produced NaN or Inf features "
                                    f"(rows from {int(idx[0])})")
                yield int(idx[0]), f
                bar.update(len(idx))
    finally:
        model.train(was_training)


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return torch.device("cpu") if p is None else p.device


def extract(
    model: nn.Module,
    data: Feed | DataSource | np.ndarray,
    batch_size: int = 512,
    flip: bool = False,
    progress: bool = True,
    desc: str = "extract",
    engine: Engine | None = None,
) -> torch.Tensor:
    """Embed every image of ``data`` (a :class:`~bctkit.engine.loader.Feed`, a source, or uint8
    images [N, C, H, W]) in batches: float32 [N, d] on the CPU; see :func:`iter_features`. Under
    several processes each rank embeds its share and every rank gets all rows (a collective call:
    every rank must make it)."""
    return all_gather_rows(extract_share(model, data, batch_size, flip, progress, desc, engine))


def extract_share(
    model: nn.Module,
    data: Feed | DataSource | np.ndarray,
    batch_size: int = 512,
    flip: bool = False,
    progress: bool = True,
    desc: str = "extract",
    engine: Engine | None = None,
) -> torch.Tensor:
    """This rank's share of :func:`extract` (all rows in one process), for :func:`gather_rows`."""
    feed = as_feed(data)
    parts = [f for _, f in iter_features(model, feed, batch_size, flip, progress and is_main(), desc,
                                         engine, share(len(feed)))]
    if parts:
        return torch.cat(parts)
    _, first = next(iter_features(model, feed, 1, False, False, desc, engine, (0, 1)))
    return first[:0]  # a rank with no rows (fewer rows than ranks) still knows the feature size


KEY_TENSORS = ("keys_blob", "keys_offsets")
"""Tensor names of a feature file's row keys: UTF-8 bytes of every key, and N + 1 int64 offsets into
them (tensors, not header JSON: millions of paths would pass safetensors' header limit)."""


@dataclass
class FeatureSet:
    """Features of one model on one image set. ``compat_dims``: leading coordinates that form the
    embedding compatible with the model's predecessor (None: all of them); ``compat_prefixes``
    (meta) every leading block compatible with some ancestor, for chains of upgrades. ``keys``
    (optional): each row's image name in its source (a path relative to the source's root, a
    RecordIO record id), so rows can be matched to images by name."""

    feats: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any]
    keys: PathTable | None = None

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
        tensors = {"feats": self.feats, "labels": self.labels}
        if self.keys is not None:
            if len(self.keys) != len(self.feats):
                raise DataError(f"{path}: {len(self.keys)} keys for {len(self.feats)} rows")
            tensors[KEY_TENSORS[0]] = torch.from_numpy(np.asarray(self.keys.blob, dtype=np.uint8))
            tensors[KEY_TENSORS[1]] = torch.from_numpy(np.asarray(self.keys.offsets, dtype=np.int64))
        save_tensors(path, tensors, self.meta)


def read_keys(tensors: dict[str, torch.Tensor], rows: int, path: Path) -> PathTable | None:
    """The row keys stored in a feature file's ``tensors`` (None when it has none), checked: a uint8
    blob and ``rows`` + 1 non-decreasing int64 offsets from 0 to the blob's length."""
    have = [k for k in KEY_TENSORS if k in tensors]
    if not have:
        return None
    if len(have) == 1:
        missing = next(k for k in KEY_TENSORS if k not in have)
        raise FileFormatError(f"{path}: has {have[0]!r} without {missing!r}")
    blob, offsets = tensors[KEY_TENSORS[0]], tensors[KEY_TENSORS[1]]
    if (blob.dtype != torch.uint8 or blob.ndim != 1 or offsets.dtype != torch.int64
            or tuple(offsets.shape) != (rows + 1,)):
        raise FileFormatError(f"{path}: keys are {str(blob.dtype).removeprefix('torch.')} "
                              f"{list(blob.shape)} + offsets {str(offsets.dtype).removeprefix('torch.')} "
                              f"{list(offsets.shape)}; expected uint8 [bytes] + int64 [{rows + 1}]")
    off = offsets.numpy()
    if off[0] != 0 or off[-1] != len(blob) or (np.diff(off) < 0).any():
        raise FileFormatError(f"{path}: key offsets must rise from 0 to {len(blob)} (the key bytes)")
    return PathTable(blob.numpy(), off)


def load_features(path: Path) -> FeatureSet:
    """Read a feature file, checking it is complete and usable: feats [N, d] with N, d >= 1, finite,
    labels [N] of an integer dtype, and row keys when present (:func:`read_keys`). Floating-point
    labels are refused whatever their values (a float label may already be rounded: float32 holds
    integers exactly only up to 2**24), so that identities are never silently truncated or merged;
    store them as int64."""
    tensors, meta = load_tensors(path)
    if "feats" not in tensors or "labels" not in tensors:
        raise FileFormatError(f"{path}: feature file needs tensors 'feats' and 'labels'")
    feats, labels = tensors["feats"], tensors["labels"]
    if feats.ndim != 2 or labels.ndim != 1 or len(feats) != len(labels):
        raise FileFormatError(
            f"{path}: expected feats [N, d] and labels [N], got {list(feats.shape)} and {list(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataError(f"{path}: labels are {str(labels.dtype).removeprefix('torch.')}; expected an "
                        "integer dtype (identity ids, e.g. int64)")
    if len(feats) == 0:
        raise DataError(f"{path}: feature file has no rows (feats {list(feats.shape)})")
    if feats.shape[1] == 0:
        raise DataError(f"{path}: feature file has no feature dimensions (feats {list(feats.shape)})")
    feats, labels = feats.float(), labels.long()
    if not torch.isfinite(feats).all():
        raise DataError(f"{path}: feats contain NaN or Inf")
    return FeatureSet(feats, labels, meta, read_keys(tensors, len(feats), path))
