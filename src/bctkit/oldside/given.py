"""Precomputed old features: read a file, match its rows to a data source (by order or by image
path) and refuse anything that would silently train or evaluate on the wrong rows."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bctkit.data.sources.base import DataSource, hash_array
from bctkit.errors import DataError, FileFormatError
from bctkit.features import read_keys
from bctkit.storage import load_tensors


def _read(path: Path) -> tuple[np.ndarray, Sequence[str] | np.ndarray | None]:
    """(features, keys or None) of a .npy, .npz (``features`` [+ ``keys``]) or .safetensors file
    (``features``, or a bctkit feature file as ``bctkit extract`` writes it: ``feats`` + row keys)."""
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found")
    keys = None
    try:
        if path.suffix == ".npy":
            feats = np.load(path, mmap_mode="r", allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "features" not in z.files:
                    raise FileFormatError(f"{path}: holds {z.files}; expected 'features' (and 'keys')")
                feats = z["features"]
                keys = z["keys"] if "keys" in z.files else None
        elif path.suffix == ".safetensors":
            tensors, _ = load_tensors(path)
            name = "features" if "features" in tensors else "feats" if "feats" in tensors else None
            if name is None:
                raise FileFormatError(f"{path}: holds {sorted(tensors)[:5]}; expected a 'features' tensor "
                                      "(or a bctkit feature file's 'feats')")
            feats = tensors[name].float().numpy()
            if feats.ndim == 2:
                table = read_keys(tensors, len(feats), path)
                keys = None if table is None else [table[i] for i in range(len(table))]
        else:
            raise FileFormatError(f"{path}: unknown features format; expected .npy, .npz or .safetensors")
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, FileFormatError):
            raise
        raise FileFormatError(f"{path}: not a readable features file ({str(exc).splitlines()[0]})") from None
    if feats.ndim != 2 or feats.dtype.kind != "f":
        raise FileFormatError(f"{path}: features are {feats.dtype} {list(feats.shape)}; "
                              "expected float [N, d]")
    if isinstance(keys, np.ndarray) and (keys.ndim != 1 or keys.dtype.kind not in "US"
                                         or len(keys) != len(feats)):
        raise FileFormatError(f"{path}: 'keys' is {keys.dtype} {list(keys.shape)}; expected {len(feats)} "
                              "strings, one image path per row")
    return feats, keys


def _rows_by_key(path: Path, keys: Sequence[str] | np.ndarray, source: DataSource) -> np.ndarray:
    index: dict[str, int] = {}
    for row, key in enumerate(keys.astype(str).tolist() if isinstance(keys, np.ndarray) else keys):
        if index.setdefault(key, row) != row:
            raise DataError(f"{path}: key {key!r} is given twice (rows {index[key]} and {row})")
    rows = np.empty(len(source), dtype=np.int64)
    missing: list[str] = []
    for i in range(len(source)):
        row = index.get(source.key(i), -1)
        rows[i] = row
        if row < 0:
            missing.append(source.key(i))
    if missing:
        raise DataError(f"{path}: no features for {len(missing)} of {len(source)} images, e.g. {missing[:3]}")
    return rows


def given_features(path: str | Path, source: DataSource, dim: int | None, what: str) -> torch.Tensor:
    """float32 [len(source), dim] features of ``source``'s images from ``path``: rows in the data's
    order, or matched by ``keys`` (image paths or RecordIO record ids, as the source names them)
    when the file has them. ``dim`` None: any dimension.
    ``what`` names the data in messages (e.g. "training")."""
    path = Path(path)
    feats, keys = _read(path)
    if dim is not None and feats.shape[1] != dim:
        raise DataError(f"{path}: features have {feats.shape[1]} dims; old.backbone.embedding_dim is {dim}")
    if keys is None:
        if len(feats) != len(source):
            raise DataError(f"{path}: {len(feats)} rows, but the {what} data has {len(source)} images; rows "
                            "must follow the data's order (or give 'keys' in a .npz to match by path)")
        out = np.array(feats, dtype=np.float32)  # a copy: the file may be memory-mapped
    else:
        out = np.asarray(feats[_rows_by_key(path, keys, source)], dtype=np.float32)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise DataError(f"{path}: the features of {what} image {i} ({source.describe(i)}) are not finite "
                        "(NaN or Inf)")
    return torch.from_numpy(np.ascontiguousarray(out))


def features_fingerprint(*arrays: torch.Tensor) -> str:
    """What identifies given old features in run keys and reports (they have no weights)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(hash_array(a.numpy()).encode())
    return "features:" + h.hexdigest()[:16]
