"""Miniature CIFAR-10 / CIFAR-100 sets written from the formats' description: binary records byte by
byte (label bytes, then the R, G, B planes row-major), python batches as pickled dicts (by this
Python, or assembled as Python 2's cPickle writes them)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from tests.storage.py2_pickle import py2_pickle

FOLDERS = {("cifar10", "binary"): "cifar-10-batches-bin", ("cifar10", "python"): "cifar-10-batches-py",
           ("cifar100", "binary"): "cifar-100-binary", ("cifar100", "python"): "cifar-100-python"}
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Split:
    """Images as [N, 32, 32, 3] (height, width, RGB: not the stored layout), fine and coarse labels."""

    def __init__(self, n: int, variant: str, rng: np.random.Generator) -> None:
        self.images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.fine = rng.integers(0, 10 if variant == "cifar10" else 100, n)
        self.fine[0] = 9 if variant == "cifar10" else 99  # the largest label is in range
        self.coarse = rng.integers(0, 20, n)
        self.coarse[-1] = 19

    def planes(self, i: int) -> bytes:
        """Image ``i``'s 3072 bytes: the red plane row by row, then green, then blue."""
        img = self.images[i]
        return b"".join(bytes(int(img[y, x, c]) for y in range(32) for x in range(32)) for c in range(3))

    def chw(self) -> np.ndarray:
        return self.images.transpose(0, 3, 1, 2)


def make_splits(variant: str, train: int = 10, test: int = 3, seed: int = 0) -> dict[str, Split]:
    rng = np.random.default_rng(seed)
    return {"train": Split(train, variant, rng), "test": Split(test, variant, rng)}


def _files(variant: str, form: str) -> dict[str, list[str]]:
    ext = ".bin" if form == "binary" else ""
    if variant == "cifar10":
        return {"train": [f"data_batch_{k}{ext}" for k in range(1, 6)], "test": [f"test_batch{ext}"]}
    return {"train": [f"train{ext}"], "test": [f"test{ext}"]}


def _chunks(n: int, parts: int) -> list[range]:
    bounds = np.linspace(0, n, parts + 1).astype(int)
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


def write_binary(root: Path, variant: str, splits: dict[str, Split], meta: bool = True) -> Path:
    """The binary form under ``root``; returns the dataset folder."""
    folder = root / FOLDERS[variant, "binary"]
    folder.mkdir(parents=True, exist_ok=True)
    for split, names in _files(variant, "binary").items():
        s = splits[split]
        for name, rows in zip(names, _chunks(len(s.fine), len(names)), strict=True):
            records = []
            for i in rows:
                labels = [s.fine[i]] if variant == "cifar10" else [s.coarse[i], s.fine[i]]
                records.append(bytes(int(v) for v in labels) + s.planes(i))
            (folder / name).write_bytes(b"".join(records))
    if meta and variant == "cifar10":
        (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n\n")
    elif meta:
        (folder / "fine_label_names.txt").write_text("\n".join(f"fine{k}" for k in range(100)) + "\n")
        (folder / "coarse_label_names.txt").write_text("\n".join(f"coarse{k}" for k in range(20)) + "\n")
    return folder


def dump(obj: dict[str, Any], how: int | str) -> bytes:
    """``obj`` pickled: ``how`` a protocol number, "py2" (cPickle protocol 2, str keys under latin1)
    or "bytes-keys" (protocol 2 with bytes keys)."""
    if how == "py2":
        return py2_pickle(obj)
    if how == "bytes-keys":
        return pickle.dumps({k.encode(): v for k, v in obj.items()}, protocol=2)
    return pickle.dumps(obj, protocol=int(how))


def write_python(root: Path, variant: str, splits: dict[str, Split], how: int | str = 4, meta: bool = True
                 ) -> Path:
    """The python form under ``root``; returns the dataset folder."""
    folder = root / FOLDERS[variant, "python"]
    folder.mkdir(parents=True, exist_ok=True)
    for split, names in _files(variant, "python").items():
        s = splits[split]
        for name, rows in zip(names, _chunks(len(s.fine), len(names)), strict=True):
            data = np.frombuffer(b"".join(s.planes(i) for i in rows), dtype=np.uint8).reshape(-1, 3072)
            batch: dict[str, Any] = {"batch_label": f"{split} batch", "data": data.copy()}
            if variant == "cifar10":
                batch["labels"] = [int(s.fine[i]) for i in rows]
            else:
                batch["fine_labels"] = [int(s.fine[i]) for i in rows]
                batch["coarse_labels"] = [int(s.coarse[i]) for i in rows]
            (folder / name).write_bytes(dump(batch, how))
    if meta and variant == "cifar10":
        (folder / "batches.meta").write_bytes(dump({"label_names": CIFAR10_NAMES, "num_vis": 3072}, how))
    elif meta:
        names = {"fine_label_names": [f"fine{k}" for k in range(100)],
                 "coarse_label_names": [f"coarse{k}" for k in range(20)]}
        (folder / "meta").write_bytes(dump(names, how))
    return folder
