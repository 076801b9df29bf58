"""``cifar``: CIFAR-10 and CIFAR-100 as distributed, in their binary or their python form.

- binary: ``cifar-10-batches-bin/data_batch_{1..5}.bin`` (train) and ``test_batch.bin``, records of
  1 label byte + 3072 pixel bytes; ``cifar-100-binary/{train,test}.bin``, records of a coarse and a
  fine label byte + 3072 pixel bytes. The pixels are the R, G and B planes of the 32x32 image, each
  row-major. Class names: ``batches.meta.txt`` / ``fine_label_names.txt`` / ``coarse_label_names.txt``.
- python: ``cifar-10-batches-py/data_batch_{1..5}``, ``test_batch`` (a pickled dict: ``data`` uint8
  [N, 3072] in the same layout, ``labels``) and ``cifar-100-python/{train,test}`` (``data``,
  ``fine_labels``, ``coarse_labels``); class names in the ``batches.meta`` / ``meta`` pickles. These
  are Python 2 pickles, read with :func:`bctkit.storage.safe_pickle.load_pickle` (latin1): a pickle
  naming anything but numpy's array constructors is refused and nothing of it runs. Keys may be str
  or bytes.

``root`` is the folder holding the extracted dataset, or the dataset's own folder. Class ids are
as stored (0..9, 0..99 fine, 0..19 coarse, in the dataset's order), which allocations such as "the
first N classes" rely on. Records are counted from 0 within their file in messages.

The split's pixels are read into memory once, as one uint8 [N, 3, 32, 32] array (150 MB for the
50000 training images): the python form has to be unpickled into memory anyway, so both forms end
up alike; a batch is then one fancy-indexing read, and DataLoader workers (forked) share the pages.
The identity is a hash of those pixels (a tenth of a second), so the binary and the python form of
the same split are the same dataset to every cache.
"""

from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from bctkit.data.sources.array import ArraySource
from bctkit.errors import ConfigError, DataError, FileFormatError
from bctkit.storage.safe_pickle import load_pickle

__all__ = ["CifarConfig", "CifarSource", "find_cifar"]

PIXELS = 3 * 32 * 32
_TITLE = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_FOLDERS = {("cifar10", "binary"): "cifar-10-batches-bin", ("cifar10", "python"): "cifar-10-batches-py",
            ("cifar100", "binary"): "cifar-100-binary", ("cifar100", "python"): "cifar-100-python"}
_BATCHES = [f"data_batch_{k}" for k in range(1, 6)]
_SPLITS = {
    ("cifar10", "binary"): {"train": [f"{b}.bin" for b in _BATCHES], "test": ["test_batch.bin"]},
    ("cifar10", "python"): {"train": _BATCHES, "test": ["test_batch"]},
    ("cifar100", "binary"): {"train": ["train.bin"], "test": ["test.bin"]},
    ("cifar100", "python"): {"train": ["train"], "test": ["test"]},
}
_CLASSES = {"cifar10": 10, "fine": 100, "coarse": 20}


class CifarConfig(BaseModel):
    """``data.cifar`` / ``data.eval.cifar``."""

    model_config = ConfigDict(extra="forbid")

    root: str
    variant: Literal["auto", "cifar10", "cifar100"] = "auto"
    form: Literal["auto", "binary", "python"] = "auto"
    labels: Literal["fine", "coarse"] = "fine"
    split: Literal["train", "test"] = "train"

    @model_validator(mode="after")
    def _coarse_needs_cifar100(self) -> CifarConfig:
        if self.labels == "coarse" and self.variant == "cifar10":
            raise ValueError("cifar.labels: coarse needs variant cifar100 (CIFAR-10 has one label set)")
        return self


def _holds(folder: Path, variant: str, form: str) -> bool:
    """Whether ``folder`` is that variant's folder in that form (it has a file of either split)."""
    return any((folder / files[0]).is_file() for files in _SPLITS[variant, form].values())


def find_cifar(root: str | os.PathLike[str], variant: str = "auto", form: str = "auto"
               ) -> tuple[Path, str, str]:
    """(dataset folder, variant, form) under or at ``root``; binary is preferred when both forms are
    there. A DataError says what was expected where."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"{base}: CIFAR folder not found (cifar.root)")
    variants = ("cifar10", "cifar100") if variant == "auto" else (variant,)
    forms = ("binary", "python") if form == "auto" else (form,)
    if not set(variants) <= set(_TITLE) or not set(forms) <= {"binary", "python"}:
        raise ConfigError(f"cifar: variant must be auto, cifar10 or cifar100 and form auto, binary or "
                          f"python, got {variant!r} and {form!r}")
    found: list[tuple[Path, str, str]] = []
    for v in variants:
        hit = next(((folder, v, f) for f in forms for folder in (base / _FOLDERS[v, f], base)
                    if _holds(folder, v, f)), None)
        if hit is not None:
            found.append(hit)
    if len(found) > 1:
        raise DataError(f"{base}: holds both CIFAR-10 and CIFAR-100; set cifar.variant")
    if found:
        return found[0]
    expected = " or ".join(f"{_FOLDERS[v, f]}/ ({_SPLITS[v, f]['test'][0]} ...)"
                           for v in variants for f in forms)
    there = [f"the {_TITLE[v]} {f} form" for v, f in _FOLDERS if any(_holds(d, v, f) for d in
                                                                      (base / _FOLDERS[v, f], base))]
    hint = f"; it holds {' and '.join(there)} (cifar.variant, cifar.form)" if there else ""
    raise DataError(f"{base}: no {' or '.join(_TITLE[v] for v in variants)} "
                    f"{'' if form == 'auto' else form + ' form '}found: expected {expected} in it, or "
                    f"cifar.root to be that folder{hint}")


def _read_binary(path: Path, n_labels: int, limits: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [n, 3072], label bytes [n, n_labels]) of one binary file, sizes and labels checked."""
    rec = n_labels + PIXELS
    size = path.stat().st_size
    if size == 0 or size % rec:
        raise FileFormatError(f"{path}: {size} bytes is not a whole number of {rec}-byte records "
                              f"({size // rec} records and {size % rec} bytes over): truncated or not a "
                              "CIFAR binary batch")
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, rec)
    for col, (what, limit) in enumerate(limits):
        bad = np.flatnonzero(raw[:, col] >= limit)
        if len(bad):
            raise DataError(f"{path}: record {bad[0]}: {what} {raw[bad[0], col]} is out of range "
                            f"(0..{limit - 1})")
    return raw[:, n_labels:], raw[:, :n_labels]


def _unpickle_dict(path: Path) -> dict[str, Any]:
    """A pickled dict with its bytes keys decoded (Python 2 pickles may give either)."""
    obj = load_pickle(path, arrays=True, encoding="latin1")
    if not isinstance(obj, dict):
        raise FileFormatError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_python(path: Path, key: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [n, 3072], labels [n]) of one pickled batch, shapes and labels checked."""
    batch = _unpickle_dict(path)
    for need in ("data", key):
        if need not in batch:
            raise FileFormatError(f"{path}: the batch has no {need!r} (keys: {sorted(map(str, batch))})")
    data = batch["data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == PIXELS):
        desc = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise FileFormatError(f"{path}: 'data' must be uint8 [N, {PIXELS}], got {desc}")
    if not len(data):
        raise FileFormatError(f"{path}: 'data' holds no images")
    labels = np.asarray(batch[key])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise FileFormatError(f"{path}: {key!r} must be a list of integers, got {labels.dtype} "
                              f"{list(labels.shape)}")
    if len(labels) != len(data):
        raise FileFormatError(f"{path}: {len(labels)} {key!r} for {len(data)} images in 'data'")
    bad = np.flatnonzero((labels < 0) | (labels >= limit))
    if len(bad):
        raise DataError(f"{path}: record {bad[0]}: {key} {labels[bad[0]]} is out of range (0..{limit - 1})")
    return data, labels


def _names(folder: Path, variant: str, form: str, which: str) -> list[str] | None:
    """The dataset's class names for labels ``which`` (fine or coarse), None without a meta file."""
    count = _CLASSES["cifar10" if variant == "cifar10" else which]
    if form == "binary":
        path = folder / ("batches.meta.txt" if variant == "cifar10" else f"{which}_label_names.txt")
        if not path.is_file():
            return None
        names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        names = [n for n in names if n]
    else:
        path = folder / ("batches.meta" if variant == "cifar10" else "meta")
        if not path.is_file():
            return None
        key = "label_names" if variant == "cifar10" else f"{which}_label_names"
        meta = _unpickle_dict(path)
        if not isinstance(meta.get(key), list):
            raise FileFormatError(f"{path}: no {key!r} list of class names")
        names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in meta[key]]
    if len(names) != count:
        raise FileFormatError(f"{path}: {len(names)} class names, expected {count}")
    return names


class CifarSource(ArraySource):
    """See the module docstring. ``folder``, ``variant``, ``form`` and ``files`` say what was read;
    ``class_names`` are the meta file's names (None without one)."""

    def __init__(self, root: str | os.PathLike[str], variant: str = "auto", form: str = "auto",
                 labels: str = "fine", split: str = "train", name: str | None = None) -> None:
        if labels not in ("fine", "coarse") or split not in ("train", "test"):
            raise ConfigError(f"cifar: labels must be fine or coarse and split train or test, got "
                              f"{labels!r} and {split!r}")
        if labels == "coarse" and variant == "cifar10":
            raise ConfigError("cifar.labels: coarse needs variant cifar100 (CIFAR-10 has one label set)")
        self.folder, self.variant, self.form = find_cifar(root, variant, form)
        if labels == "coarse" and self.variant == "cifar10":
            raise ConfigError(f"{self.folder}: is CIFAR-10, which has no coarse labels (cifar.labels)")
        self.which, self.split = labels, split
        files = _SPLITS[self.variant, self.form][split]
        self.files = [self.folder / f for f in files]
        for p in self.files:
            if not p.is_file():
                raise DataError(f"{p}: not found; the {_TITLE[self.variant]} {self.form} {split} split is "
                                f"{' + '.join(files)} in {self.folder}")
        parts = [self._read(p) for p in self.files]
        self.counts = np.asarray([len(lab) for _, lab in parts], dtype=np.int64)
        images = np.empty((int(self.counts.sum()), PIXELS), dtype=np.uint8)
        np.concatenate([px for px, _ in parts], out=images)
        label_array = np.concatenate([lab for _, lab in parts]).astype(np.int64)
        del parts
        self.class_names = _names(self.folder, self.variant, self.form, labels)
        title = _TITLE[self.variant] + (" coarse" if labels == "coarse" else "")
        super().__init__(images.reshape(-1, 3, 32, 32), label_array, name or f"{title} {split}")

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        if self.variant == "cifar10":
            if self.form == "binary":
                pixels, lab = _read_binary(path, 1, [("label", 10)])
                return pixels, lab[:, 0]
            return _read_python(path, "labels", 10)
        if self.form == "binary":
            pixels, lab = _read_binary(path, 2, [("coarse label", 20), ("fine label", 100)])
            return pixels, lab[:, 0 if self.which == "coarse" else 1]
        return _read_python(path, f"{self.which}_labels", _CLASSES[self.which])

    @cached_property
    def _pixel_hash(self) -> str:
        return hashlib.sha256(memoryview(np.ascontiguousarray(self.images)).cast("B")).hexdigest()[:32]

    def identity(self) -> dict[str, Any]:
        return {"format": "cifar", "variant": self.variant, "split": self.split, "images": len(self),
                "pixels": self._pixel_hash}

    def describe(self, i: int) -> str:
        k = int(np.searchsorted(np.cumsum(self.counts), i, side="right"))
        return f"{self.files[k]} record {i - int(self.counts[:k].sum())}"

    def label_name(self, label: int) -> str:
        names = self.class_names
        return names[label] if names is not None and 0 <= label < len(names) else str(label)
