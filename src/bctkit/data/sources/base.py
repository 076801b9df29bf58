"""The dataset-source interface: labels known cheaply, images decoded one at a time on demand.

Every dataset bctkit reads is a :class:`DataSource`. It answers three questions without decoding a
single image: how many images there are, the label of each (int64), and its identity (a small JSON
description hashed into :meth:`DataSource.fingerprint`, which keys runs and caches). An image is
decoded only when :meth:`DataSource.read` asks for it. Everything downstream (allocations, training,
the old-feature cache, extraction) works on index arrays into a source: :meth:`DataSource.subset`
is a view (indices + labels), never a copy of pixels.

Images come out as uint8 ``[C, H, W]`` (C = 1 grey or 3 RGB) at their stored size and colour; the
preprocessing a model wants (resize, crop, colour) is :mod:`bctkit.data.transforms`' job.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from bctkit.errors import DataError

__all__ = [
    "CorruptImageError", "DataSource", "PathSource", "PathTable", "SubsetSource", "decode_image",
    "hash_array", "listed_file_size", "to_chw",
]


class CorruptImageError(DataError):
    """An image that cannot be decoded (corrupt, truncated, unsupported); ``data.skip_corrupt``
    drops such images instead of stopping."""


def listed_file_size(path: Path, where: str) -> int:
    """Size of an image file a list names; a one-line DataError naming ``where`` (file:line) and the
    path when it is missing."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise DataError(f"{where}: {path}: image file not found") from None


def hash_array(arr: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    h = hashlib.sha256(f"{arr.dtype.str}{list(arr.shape)}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


class DataSource(ABC):
    """A labelled collection of images; see the module docstring.

    Subclasses implement :attr:`labels`, :meth:`read`, :meth:`identity` and :meth:`describe`.
    Sources are picklable (DataLoader workers get a copy); open files are reopened per process.
    """

    name: str = "source"
    reads_batches: bool = False
    """True when :meth:`read_many` gives a whole batch as one array faster than image by image."""

    @property
    @abstractmethod
    def labels(self) -> np.ndarray:
        """int64 label of every image, in source order."""

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def read(self, i: int) -> Image.Image | np.ndarray:
        """Image ``i`` as stored: a decoded PIL image (mode L or RGB) or a uint8 [C, H, W] array."""

    def read_many(self, indices: np.ndarray) -> np.ndarray:
        """Images at ``indices`` as one uint8 [B, C, H, W] array (they must share a shape); sources
        with ``reads_batches`` do this in one step."""
        return np.stack([self.decode(int(i)) for i in indices])

    def decode(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 [C, H, W] at its stored size and colour."""
        return to_chw(self.read(i))

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-able description of exactly these images (hashes of index files, manifests,
        generator settings), without the labels; machine-independent where possible."""

    @abstractmethod
    def describe(self, i: int) -> str:
        """Where image ``i`` comes from, for error messages (a path, a record number)."""

    def key(self, i: int) -> str:
        """A stable name of image ``i`` (its path for file sources, else its index)."""
        return str(i)

    def stored_shape(self) -> tuple[int, int, int] | None:
        """[C, H, W] shared by every image when known without decoding, else None."""
        return None

    def label_name(self, label: int) -> str:
        """How the dataset names identity ``label`` (its folder name, say), for messages."""
        return str(label)

    @cached_property
    def _fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode())
        h.update(hash_array(np.asarray(self.labels, dtype=np.int64)).encode())
        return h.hexdigest()[:16]

    def fingerprint(self) -> str:
        """Identifies these images and labels: a hash of :meth:`identity` and the labels, never of
        the pixels (so it costs nothing on a dataset of millions of images)."""
        return self._fingerprint

    @property
    def num_classes(self) -> int:
        """Number of distinct labels."""
        return len(np.unique(self.labels))

    def subset(self, indices: np.ndarray | None = None, labels: np.ndarray | None = None) -> SubsetSource:
        """A view of the images at ``indices`` (default all), optionally relabelled."""
        idx = np.arange(len(self), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= len(self))):
            raise DataError(f"{self.name}: subset indices must be 1-D in [0, {len(self)})")
        lab = self.labels[idx] if labels is None else np.asarray(labels)
        return SubsetSource(self, idx, lab)


class SubsetSource(DataSource):
    """Images ``indices`` of ``parent`` with ``labels`` (a view: no pixels are copied). A subset of
    a subset points at the original source."""

    def __init__(self, parent: DataSource, indices: np.ndarray, labels: np.ndarray, name: str | None = None
                 ) -> None:
        if isinstance(parent, SubsetSource):
            indices, parent = parent.indices[indices], parent.parent
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)
        self._labels = check_labels(labels, f"{parent.name} subset")
        if len(self._labels) != len(self.indices):
            raise DataError(f"{parent.name}: subset has {len(self.indices)} indices but "
                            f"{len(self._labels)} labels")
        self.name = name or parent.name

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def reads_batches(self) -> bool:  # type: ignore[override]
        return self.parent.reads_batches

    def read(self, i: int) -> Image.Image | np.ndarray:
        return self.parent.read(int(self.indices[i]))

    def read_many(self, indices: np.ndarray) -> np.ndarray:
        return self.parent.read_many(self.indices[np.asarray(indices, dtype=np.int64)])

    def identity(self) -> dict[str, Any]:
        return {"subset_of": self.parent.fingerprint(), "indices": hash_array(self.indices)[:32]}

    def describe(self, i: int) -> str:
        return self.parent.describe(int(self.indices[i]))

    def key(self, i: int) -> str:
        return self.parent.key(int(self.indices[i]))

    def stored_shape(self) -> tuple[int, int, int] | None:
        return self.parent.stored_shape()

    def label_name(self, label: int) -> str:
        """The parent's name of ``label`` when the subset keeps the parent's labels."""
        return self.parent.label_name(label) if self.keeps_labels else str(label)

    @cached_property
    def keeps_labels(self) -> bool:
        return bool(np.array_equal(self._labels, self.parent.labels[self.indices]))


def check_labels(labels: Any, where: str) -> np.ndarray:
    """``labels`` as a 1-D int64 array of non-negative integers, or a DataError naming ``where``."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"{where}: labels must be 1-D, got shape {list(arr.shape)}")
    if len(arr) and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if len(arr) and arr.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, found {int(arr.min())}")
    return arr


_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
_GREY_MODES = {"L", "LA", "1"}


def decode_image(data: str | os.PathLike[str] | bytes, where: str) -> Image.Image:
    """Decode a file (path) or encoded bytes into a fully loaded PIL image of mode L or RGB.
    Colour images (palette, alpha, CMYK ...) become RGB, grey ones L. A missing file is a
    DataError, an undecodable or truncated one a :class:`CorruptImageError`; both name ``where``."""
    try:
        img = _open(data)
        img.load()  # decodes now: a truncated file fails here, not later
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as exc:
        raise CorruptImageError(f"{where}: corrupt or truncated image ({exc})") from None
    if img.mode in ("RGB", "L"):
        return img
    target = "RGB" if img.mode in _COLOUR_MODES else "L" if img.mode in _GREY_MODES else None
    if target is None:
        img.close()
        raise CorruptImageError(f"{where}: image mode {img.mode!r} (16-bit or float pixels) is not "
                                "supported; convert it to 8-bit grey or RGB")
    converted = img.convert(target)
    img.close()
    return converted


@lru_cache(maxsize=1)
def _extension_formats() -> dict[str, str]:
    Image.init()
    return {ext.lower(): fmt for ext, fmt in Image.registered_extensions().items()}


def _open(data: str | os.PathLike[str] | bytes) -> Image.Image:
    """Image.open, told the likely format (from the file extension, or the JPEG / PNG signature of
    encoded bytes) so Pillow does not try its other plugins first; a file whose content is another
    format than its name says is still opened, by the full search."""
    if isinstance(data, bytes):
        hint = "JPEG" if data[:3] == b"\xff\xd8\xff" else "PNG" if data[:8] == b"\x89PNG\r\n\x1a\n" else None
    else:
        hint = _extension_formats().get(os.path.splitext(os.fspath(data))[1].lower())
    if hint is not None:
        try:
            return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data, formats=[hint])
        except UnidentifiedImageError:
            pass
    return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)


def to_chw(img: Image.Image | np.ndarray) -> np.ndarray:
    """A decoded image as uint8 [C, H, W] (arrays pass through unchanged)."""
    if isinstance(img, np.ndarray):
        return img
    arr = np.asarray(img)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class PathTable:
    """Many relative paths in two numpy arrays (UTF-8 bytes + offsets) instead of a list of str:
    a few bytes per path, and DataLoader workers forked from the process share the pages instead of
    copying them as touching millions of Python objects' reference counts would."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self.blob = blob
        self.offsets = offsets

    @classmethod
    def from_paths(cls, paths: Sequence[str]) -> PathTable:
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        return cls(blob, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.blob[start:end].tobytes().decode("utf-8", "surrogateescape")

    def digest(self) -> str:
        """sha256 of the paths in order."""
        return hashlib.sha256(self.blob.tobytes() + self.offsets.tobytes()).hexdigest()


class PathSource(DataSource):
    """Images that are files under one folder (image folders, list files): relative ``paths``, their
    byte sizes and labels. Identity = a hash of the relative paths and sizes (so moving the dataset
    keeps it); images are decoded from ``folder / path``."""

    format: str = "files"

    def __init__(self, folder: Path, paths: PathTable, sizes: np.ndarray, labels: np.ndarray, name: str
                 ) -> None:
        self.folder = folder
        self.paths = paths
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._labels = np.asarray(labels, dtype=np.int64)
        self._dir = str(folder)
        self.name = name

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def read(self, i: int) -> Image.Image:
        path = os.path.join(self._dir, self.paths[i])
        return decode_image(path, path)

    def identity(self) -> dict[str, Any]:
        h = hashlib.sha256(self.paths.digest().encode())
        h.update(self._sizes.tobytes())
        return {"format": self.format, "images": len(self), "manifest": h.hexdigest()[:32]}

    def describe(self, i: int) -> str:
        return os.path.join(self._dir, self.paths[i])

    def key(self, i: int) -> str:
        return self.paths[i]


def file_signature(path: Path, edge: int = 1 << 20) -> dict[str, Any]:
    """Cheap identity of a (possibly huge) file: size, mtime and a hash of its first and last
    ``edge`` bytes. Keys caches of what was scanned from it."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(edge))
        if st.st_size > edge:
            fh.seek(max(edge, st.st_size - edge))
            h.update(fh.read(edge))
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "edges": h.hexdigest()[:32]}
