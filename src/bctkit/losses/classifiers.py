"""Loading old classifiers trained elsewhere, for the BCT influence loss and LwF.

``load_classifier`` reads one (num_classes, dim) weight matrix from ``.npy`` (never unpickled) or
``.safetensors``. ``merge_classifier_shards`` joins the per-rank shards of a model-parallel
classifier (insightface partial FC: rank r holds a contiguous block of classes, ranks in order) into
one matrix. Every problem is a one-line FileFormatError (unreadable file) or DataError (unusable
values) naming the file or shard.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from bctkit.errors import DataError, FileFormatError

__all__ = ["load_classifier", "merge_classifier_shards"]

Shard = str | os.PathLike[str] | torch.Tensor | np.ndarray
_RANK = re.compile(r"rank[_-]?(\d+)", re.IGNORECASE)


def _checked(name: str, w: torch.Tensor) -> torch.Tensor:
    """A 2-D, non-empty, finite, floating (num_classes, dim) matrix as contiguous float32."""
    if w.ndim != 2:
        raise DataError(f"{name} has shape {tuple(w.shape)}; expected a 2-D (num_classes, dim) matrix")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise DataError(f"{name} has shape {tuple(w.shape)}; expected at least one class and one dim")
    if not w.dtype.is_floating_point:
        raise DataError(f"{name} has dtype {w.dtype}; expected floating-point weights")
    bad = ~torch.isfinite(w).all(dim=1)
    if bool(bad.any()):
        raise DataError(f"{name} row {int(bad.nonzero()[0, 0])} contains NaN or Inf; expected finite weights")
    return w.float().contiguous()


def _load_npy(path: Path) -> torch.Tensor:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FileFormatError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0]})") from None
    if not isinstance(arr, np.ndarray):
        raise FileFormatError(f"{path}: expected a single .npy array, not an archive")
    if arr.dtype.kind != "f":
        raise DataError(f"{path}: dtype {arr.dtype}; expected floating-point weights")
    return torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32, copy=False))


def _load_safetensors(path: Path, key: str | None) -> torch.Tensor:
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            if key is None:
                if "weight" in keys:
                    key = "weight"
                elif len(keys) == 1:
                    key = keys[0]
                else:
                    raise FileFormatError(
                        f"{path}: holds tensors {keys[:10]}; expected one named 'weight' or a single "
                        "tensor (pass key=...)"
                    )
            if key not in keys:
                raise FileFormatError(f"{path}: no tensor {key!r}; it holds {keys[:10]}")
            return fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, FileFormatError):
            raise
        raise FileFormatError(f"{path}: not a readable safetensors file ({exc})") from None


def load_classifier(path: str | os.PathLike[str], key: str | None = None) -> torch.Tensor:
    """Read a classifier weight matrix (num_classes, dim) as float32.

    ``.npy``: the array (``allow_pickle=False``). ``.safetensors``: the tensor ``key``, else the one
    named ``weight``, else the file's only tensor.
    """
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"{p}: classifier file not found")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        w = _load_npy(p)
    elif suffix == ".safetensors":
        w = _load_safetensors(p, key)
    else:
        raise FileFormatError(f"{p}: unknown classifier format {suffix!r}; expected .npy or .safetensors")
    return _checked(str(p), w)


def _check_rank_order(shards: Sequence[Shard]) -> None:
    """Paths named ``..rank_<r>..`` must come in increasing rank order (a plain sort puts rank_10
    before rank_2, which would silently permute classes)."""
    names = [Path(s).name for s in shards if isinstance(s, str | os.PathLike)]
    if len(names) != len(shards):
        return
    matches = [_RANK.search(n) for n in names]
    if not all(matches):
        return
    ranks = [int(m.group(1)) for m in matches if m is not None]
    if ranks != sorted(set(ranks)):
        raise DataError(
            f"classifier shards are not in rank order ({', '.join(names)}); pass them sorted by rank"
        )


def merge_classifier_shards(shards: Sequence[Shard], num_classes: int | None = None) -> torch.Tensor:
    """Concatenate per-rank classifier shards (paths or tensors/arrays, in rank order) by rows.

    Each shard is a contiguous block of classes; all must share the embedding dim. ``num_classes``,
    when given, must equal the merged row count.
    """
    if len(shards) == 0:
        raise DataError("classifier shards: got none; expected at least one shard")
    _check_rank_order(shards)
    parts: list[torch.Tensor] = []
    for i, s in enumerate(shards):
        if isinstance(s, torch.Tensor | np.ndarray):
            t = torch.as_tensor(s).detach().cpu()
            parts.append(_checked(f"classifier shard {i}", t))
        else:
            parts.append(load_classifier(s))
        if parts[-1].shape[1] != parts[0].shape[1]:
            raise DataError(
                f"classifier shard {i} has embedding dim {parts[-1].shape[1]}; expected "
                f"{parts[0].shape[1]} like shard 0"
            )
    merged = torch.cat(parts)
    if num_classes is not None and merged.shape[0] != num_classes:
        raise DataError(
            f"classifier shards hold {merged.shape[0]} classes in all; expected num_classes={num_classes}"
        )
    return merged
