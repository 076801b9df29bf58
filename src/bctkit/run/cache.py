"""The old-feature cache: old-model features of the training images, computed once, kept on disk.

Old features of the new training images never change during training (the old model is frozen and
the images are taken un-augmented), so every method and every run that uses the same old model, the
same images and the same transform can share one file (methods.md, "Compatibility methods").

A cache entry is ``<root>/old-<key>.npy``, a plain ``.npy`` array (N, d) opened memory-mapped, plus
the sidecar ``<root>/old-<key>.json`` recording what it was made from: the old model's fingerprint,
the images' fingerprint (pixels and labels, so it also pins the allocation), the transform, the
dtype, the shape, the file size and a CRC-32 of the data. ``key`` hashes all of them but the last
three, so a change of any of them names another file, and an entry is used only when the sidecar
matches in every field and the array file is complete. Anything else (missing, truncated or
corrupt file, unreadable sidecar, checksum mismatch) makes the entry be rebuilt; never a crash and
never silently wrong features. Files are written to a temporary name and renamed into place (the
array first, the sidecar last, so a sidecar always describes a complete array).

Transform: images are read through the model's preprocessing (``data.transform``: colour, resize,
crop, mean/std; recorded in the key), never augmented. ``flip=True`` stores the mean of the features
of the image and of its horizontal mirror, (f(x) + f(flip(x))) / 2: the same direction as the flip
test's sum, and the same scale as an unflipped feature, which matters for terms that do not
normalise. The images' fingerprint is their source's (index files, labels, the subset's indices),
never a hash of pixels.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import nn

from bctkit.data.sources.base import DataSource
from bctkit.data.transforms import TransformConfig
from bctkit.engine.distributed import barrier, broadcast_object, is_main, max_across, share, world_size
from bctkit.engine.loader import Feed, as_feed
from bctkit.errors import DataError
from bctkit.features import iter_features
from bctkit.losses.unibct.prototypes import class_means
from bctkit.storage import write_json

if TYPE_CHECKING:
    from bctkit.engine.compute import Engine

__all__ = ["OldFeatureCache", "as_tensor", "class_means_from_cache"]

FORMAT = 1
CacheDtype = Literal["float32", "float16"]
_CRC_BLOCK = 1 << 24  # bytes hashed at a time


def _transform(flip: bool, preprocessing: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "input": "uint8 -> x / 127.5 - 1",
        "augment": "none",
        "flip": "mean of f(x) and f(hflip(x))" if flip else "none",
    }
    if preprocessing is not None and not _is_default(preprocessing):
        out["input"] = preprocessing
    return out


def _is_default(preprocessing: dict[str, Any]) -> bool:
    """The default preprocessing (stored size and colour, [0, 255] -> [-1, 1])."""
    config = {k: v for k, v in preprocessing.items() if k != "input"}
    return config == TransformConfig().model_dump(mode="json")


def _crc32(arr: np.ndarray) -> int:
    """CRC-32 of the array's bytes, read in blocks (fine for memmaps larger than RAM)."""
    flat = arr.reshape(-1).view(np.uint8)
    crc = 0
    for start in range(0, flat.size, _CRC_BLOCK):
        crc = zlib.crc32(flat[start : start + _CRC_BLOCK], crc)
    return crc


class OldFeatureCache:
    """Old-model features of training images, on disk under ``root``; see the module docstring.

    ``hits`` / ``misses`` count :meth:`get` calls answered from disk / by running the old model.
    ``verify`` checks the CRC-32 of an entry on every hit (one sequential read of the file).
    ``log`` receives one line per hit, build and rebuild reason.
    """

    def __init__(self, root: str | os.PathLike[str], verify: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.verify = verify
        self.log = log or (lambda _msg: None)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model_fingerprint: str, images_fingerprint: str, flip: bool = False,
            dtype: CacheDtype = "float32", preprocessing: dict[str, Any] | None = None) -> str:
        """Name of the entry for these inputs."""
        ident = {"format": FORMAT, "model_fingerprint": model_fingerprint,
                 "images_fingerprint": images_fingerprint, "transform": _transform(flip, preprocessing),
                 "dtype": dtype}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]

    def paths(self, key: str) -> tuple[Path, Path]:
        """(array file, sidecar) of entry ``key``."""
        return self.root / f"old-{key}.npy", self.root / f"old-{key}.json"

    def get(
        self,
        model: nn.Module,
        model_fingerprint: str,
        images: Feed | DataSource | np.ndarray,
        images_fingerprint: str | None = None,
        flip: bool = False,
        batch_size: int = 512,
        progress: bool = True,
        dtype: CacheDtype = "float32",
        engine: Engine | None = None,
    ) -> np.memmap:
        """Old features (N, d) of ``images`` (a Feed, a source, or uint8 [N, C, H, W]),
        memory-mapped read-only; computed with ``model`` only when no valid entry exists for these
        fingerprints, preprocessing, flip and dtype. ``images_fingerprint`` defaults to the
        source's. ``engine``: device and precision of the extraction. Under several processes every
        rank calls this: each embeds its share of the rows into the one file rank 0 creates (the
        cache directory must be shared by the ranks, as on one machine), and all open the result."""
        if isinstance(images, np.ndarray) and (images.dtype != np.uint8 or images.ndim != 4):
            raise DataError(f"old-feature cache: images are {images.dtype} {list(images.shape)}; "
                            "expected uint8 [N, C, H, W]")
        feed = as_feed(images)
        if len(feed) == 0:
            raise DataError("old-feature cache: no images; expected at least one")
        if dtype not in ("float32", "float16"):
            raise DataError(f"old-feature cache: dtype {dtype!r}; expected 'float32' or 'float16'")
        images_fp = images_fingerprint or feed.source.fingerprint()
        spec = feed.spec()
        key = self.key(model_fingerprint, images_fp, flip, dtype, spec)
        meta = {"format": FORMAT, "key": key, "model_fingerprint": model_fingerprint,
                "images_fingerprint": images_fp, "transform": _transform(flip, spec), "dtype": dtype}
        feats, reason = self._open(key, meta, len(feed))
        hit = broadcast_object(feats is not None)  # rank 0 decides for every rank
        if hit and feats is None:
            raise DataError(f"old-feature cache: rank 0 reads entry {key} but this rank cannot ({reason}); "
                            "the cache directory must be the same for every process")
        if not hit:
            feats = None
        if feats is not None:
            self.hits += 1
            self.log(f"[cache] reusing old features {self.paths(key)[0].name}")
            return feats
        self.misses += 1
        self.log(f"[cache] computing old features {self.paths(key)[0].name} ({reason})")
        self._build(key, meta, model, feed, flip, batch_size, progress, dtype, engine)
        feats, reason = self._open(key, meta, len(feed))
        if feats is None:
            raise DataError(f"old-feature cache: entry {key} unreadable right after writing it ({reason})")
        return feats

    def _open(self, key: str, meta: dict[str, Any], n: int) -> tuple[np.memmap | None, str]:
        """The entry's array if it is complete and matches ``meta``; else None and why not."""
        npy, side = self.paths(key)
        if not side.is_file() or not npy.is_file():
            return None, "no entry"
        try:
            stored = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None, "unreadable sidecar"
        if not isinstance(stored, dict) or any(stored.get(k) != v for k, v in meta.items()):
            return None, "sidecar does not match"
        if npy.stat().st_size != stored.get("file_size"):
            return None, "array file has the wrong size (truncated?)"
        try:
            arr = np.load(npy, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError):
            return None, "unreadable array file"
        if not isinstance(arr, np.memmap) or arr.dtype != np.dtype(meta["dtype"]) or arr.ndim != 2:
            return None, "array file has the wrong dtype or rank"
        if list(arr.shape) != stored.get("shape") or arr.shape[0] != n:
            return None, "array file has the wrong shape"
        if self.verify and _crc32(arr) != stored.get("crc32"):
            return None, "checksum mismatch (corrupt file)"
        return arr, ""

    def _build(self, key: str, meta: dict[str, Any], model: nn.Module, feed: Feed, flip: bool,
               batch_size: int, progress: bool, dtype: CacheDtype, engine: Engine | None) -> None:
        """Extract batch by batch straight into a temporary memmap (each rank its rows), then
        rename it into place."""
        npy, side = self.paths(key)
        n = len(feed)
        tmp_name = None
        if is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            side.unlink(missing_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{npy.name}.", suffix=".tmp", dir=self.root)
            os.close(fd)
        tmp = Path(broadcast_object(tmp_name))
        rows = share(n)
        try:
            blocks = iter_features(model, feed, batch_size, flip=flip, progress=progress and is_main(),
                                   desc="old features", engine=engine, rows=rows)
            first = next(blocks, None)
            dim = max_across(0 if first is None else first[1].shape[1])
            if is_main():
                open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, dim)).flush()
            barrier()
            out = open_memmap(tmp, mode="r+")
            crc = 0
            for start, f in itertools.chain([] if first is None else [first], blocks):
                if flip:
                    f = f / 2
                block = f.numpy().astype(dtype)
                if not np.isfinite(block).all():
                    raise DataError(
                        f"old-feature cache: features overflow {dtype} (rows from {start}); use float32"
                    )
                out[start : start + len(block)] = block
                crc = zlib.crc32(np.ascontiguousarray(block).reshape(-1).view(np.uint8), crc)
            out.flush()
            del out
            barrier()
            if is_main():
                if world_size() > 1:  # the rows came from every rank: hash the file once
                    crc = _crc32(np.load(tmp, mmap_mode="r", allow_pickle=False))
                os.replace(tmp, npy)
                write_json(side, {**meta, "shape": [n, dim], "file_size": npy.stat().st_size, "crc32": crc})
        finally:
            if is_main():
                tmp.unlink(missing_ok=True)
        barrier()


def as_tensor(feats: np.memmap) -> torch.Tensor:
    """A zero-copy torch view of a cached array (reopened copy-on-write, so torch gets a writable
    buffer; the file itself is never modified)."""
    if not isinstance(feats, np.memmap) or feats.filename is None:
        raise DataError("as_tensor: expected an array returned by OldFeatureCache.get")
    cow = np.memmap(feats.filename, dtype=feats.dtype, mode="c", offset=feats.offset, shape=feats.shape)
    return torch.from_numpy(cow)


def class_means_from_cache(feats: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                           num_classes: int) -> torch.Tensor:
    """Per-class mean of the normalised cached old features
    (:func:`bctkit.losses.unibct.prototypes.class_means`; it reads memmaps block by block)."""
    return class_means(feats, labels, num_classes)
