"""The old model's classifier from outside: one [classes, d] matrix or arcface_torch's per-rank
Partial FC shards, and the map from the training data's classes to its rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bctkit.data.sources.base import DataSource, SubsetSource
from bctkit.errors import ConfigError, FileFormatError
from bctkit.models.weights import load_state_dict_file
from bctkit.oldside.config import ClassifierConfig
from bctkit.storage import read_json


def shard_rows(total: int, world: int, rank: int) -> int:
    """Classes held by ``rank`` of ``world`` when arcface_torch's Partial FC splits ``total``
    classes into contiguous ranges: the first ``total % world`` ranks hold one more."""
    return total // world + int(rank < total % world)


def _matrix(path: Path) -> torch.Tensor:
    """The one 2-D tensor of a classifier file (the ``weight`` entry of a state dict, or the file's
    one bare tensor)."""
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise FileFormatError(f"{path}: file not found") from None
        except (OSError, ValueError) as exc:
            raise FileFormatError(f"{path}: not a readable .npy array ({exc})") from None
        tensors = {"weight": torch.from_numpy(np.asarray(arr))}
    else:  # a bare tensor: older arcface_torch's rank_{r}_softmax_weight.pt
        tensors = load_state_dict_file(path, bare="weight")
    name = "weight" if "weight" in tensors else next(iter(tensors)) if len(tensors) == 1 else None
    if name is None:
        raise FileFormatError(f"{path}: holds {sorted(tensors)[:5]}; expected one [classes, d] matrix "
                              "or a 'weight' entry")
    w = tensors[name]
    if w.ndim != 2 or not w.is_floating_point():
        raise FileFormatError(f"{path}: '{name}' is {w.dtype} {list(w.shape)}; expected a float "
                              "[classes, d] matrix")
    return w.float()


def load_classifier(cfg: ClassifierConfig, dim: int) -> torch.Tensor:
    """[classes, dim] float32 weights; several files are Partial FC shards in rank order, checked
    against the contiguous split of their total so that a missing shard, or one on a rank of another
    size, is named (shards of equal size in the wrong order cannot be told apart by their sizes)."""
    paths = [Path(p) for p in cfg.weights]
    shards = [_matrix(p) for p in paths]
    for path, w in zip(paths, shards, strict=True):
        if w.shape[1] != dim:
            raise FileFormatError(f"{path}: classifier rows have {w.shape[1]} dims; the old model's "
                                  f"embedding has {dim}")
    total, world = sum(w.shape[0] for w in shards), len(shards)
    if cfg.num_classes is not None and total != cfg.num_classes:
        raise FileFormatError(f"old.classifier.weights: {world} file(s) hold {total} classes; "
                              f"old.classifier.num_classes is {cfg.num_classes}")
    for rank, (path, w) in enumerate(zip(paths, shards, strict=True)):
        want = shard_rows(total, world, rank)
        if w.shape[0] != want:
            raise FileFormatError(
                f"{path}: shard {rank} of {world} holds {w.shape[0]} classes, but Partial FC's split of "
                f"{total} classes gives rank {rank} {want}; list every shard in rank order")
    weight = torch.cat(shards) if world > 1 else shards[0]
    bad = (~torch.isfinite(weight)).any(dim=1).nonzero()
    if len(bad):
        raise FileFormatError(f"{paths[0] if world == 1 else 'old.classifier.weights'}: row "
                              f"{int(bad[0])} of the classifier is not finite (NaN or Inf)")
    return weight.contiguous()


def _read_map(path: Path) -> object:
    try:
        return read_json(path)
    except FileFormatError as exc:
        raise ConfigError(f"old.classifier.label_map: {exc}") from None


def _row(value: object, rows: int, where: str) -> int:
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < rows:
        raise ConfigError(f"{where}: {value!r} is not a row of the {rows}-class old classifier (or null)")
    return value


def class_ids(source: DataSource) -> tuple[DataSource, int]:
    """The dataset whose class ids ``source``'s labels are, and how many ids it has: a view (the
    training pool of a seeded test split, which keeps the dataset's ids, gaps included) answers for
    the dataset it was taken from."""
    root = source.parent if isinstance(source, SubsetSource) else source
    return root, int(root.labels.max()) + 1 if len(root) else 0


def class_rows(spec: str, source: DataSource, rows: int, ids: np.ndarray | None = None) -> np.ndarray:
    """For each training class, in order of its class id, its row in the old classifier (-1 when new
    to the old model). A map is given over the dataset's class ids (:func:`class_ids`): ``identity``
    maps id r to row r, a JSON list has one entry per id, an object names classes; held-out ids
    may appear in it. ``ids``: the dataset ids of the training classes when ``source`` has been
    renumbered 0..n-1 (default: its distinct labels)."""
    root, n = class_ids(source)
    ids = np.unique(source.labels) if ids is None else np.asarray(ids, dtype=np.int64)
    if spec == "identity":
        if rows != n:
            raise ConfigError(f"old.classifier.label_map: identity needs as many classifier rows ({rows}) "
                              f"as the training data has class ids ({n}); give a JSON map")
        return ids.copy()
    path = Path(spec)
    data = _read_map(path)
    out = np.full(n, -1, dtype=np.int64)
    if isinstance(data, list):
        if len(data) != n:
            raise ConfigError(f"{path}: {len(data)} entries; the training data has {n} class ids "
                              "(one entry per class id, null for a class new to the old model)")
        for k, value in enumerate(data):
            out[k] = _row(value, rows, f"{path}: entry {k}")
    elif isinstance(data, dict):
        by_name = {root.label_name(k): k for k in range(n)}
        unknown = [name for name in data if name not in by_name]
        if unknown:
            raise ConfigError(f"{path}: {len(unknown)} class name(s) not in the training data, e.g. "
                              f"{unknown[:3]}")
        for name, value in data.items():
            out[by_name[name]] = _row(value, rows, f"{path}: {name!r}")
    else:
        raise ConfigError(f"{path}: expected a JSON list (one row or null per class id) or an object "
                          "{class name: row}")
    used, counts = np.unique(out[out >= 0], return_counts=True)
    if (counts > 1).any():
        raise ConfigError(f"{path}: classifier row {int(used[counts > 1][0])} is given to more than one "
                          "training class")
    return out[ids]
