"""``pairbin``: verification pair sets as insightface distributes them (``lfw.bin``, ``cfp_fp.bin``,
``agedb_30.bin``, ``calfw.bin``, ...), read without running any code from the file.

A ``<name>.bin`` file is a pickle of one pair ``(bins, issame)``: ``bins`` the encoded images (JPEG or
PNG bytes, already aligned, 112 x 112 in insightface's sets), two per verification pair in order, and
``issame`` one bool per pair (True: both images show the same person). Most distributed files were
written by Python 2, so the images are Python 2 ``str`` objects, read here as bytes (the pickle
module's ``encoding="bytes"``).

The file is read by :class:`PairBinUnpickler`, whose ``find_class`` refuses every global and whose
``persistent_load`` refuses every persistent id: a pickle can only build objects (or call anything)
through those two hooks, so a file that would run code is refused before anything runs. The loaded
value must then be exactly a list or tuple of bytes and a list or tuple of plain ``bool`` with twice
as many images as flags. Numpy bools, which some third-party writers produce, are pickled through
numpy's reconstruction globals and are refused like any other global: re-save such a file with
``issame = [bool(x) for x in issame]`` (insightface's LFW and AgeDB packing scripts write plain
bools).

Row ``i`` of :class:`PairBinSource` is image ``i`` of the file, so pair ``p`` is rows ``2p`` (first
image) and ``2p + 1`` (second image). Labels say what the file says and nothing more: row ``2p`` has
label ``2p``; row ``2p + 1`` has label ``2p`` when the pair is genuine, ``2p + 1`` when it is an
impostor pair. Equal labels therefore mean "same person" only within a pair; across pairs the file
does not say who is who, and labels of different pairs always differ. The pair flags are also
recoverable from saved features' labels (``labels[0::2] == labels[1::2]``).
"""

from __future__ import annotations

import hashlib
import io
import pickle
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from PIL import Image

from bctkit.data.sources.base import CorruptImageError, DataSource, decode_image
from bctkit.errors import DataError, FileFormatError

__all__ = ["PairBinImageError", "PairBinSource", "PairBinUnpickler", "load_pair_bin", "pair_labels"]

_HINTS = {
    ("numpy.core.multiarray", "scalar"): "numpy scalars such as numpy bools; re-save the flags as "
                                         "plain Python bools",
    ("numpy._core.multiarray", "scalar"): "numpy scalars such as numpy bools; re-save the flags as "
                                          "plain Python bools",
    ("numpy.core.multiarray", "_reconstruct"): "a numpy array; re-save it as a list",
    ("numpy._core.multiarray", "_reconstruct"): "a numpy array; re-save it as a list",
    ("_codecs", "encode"): "bytes pickled by Python 3 at protocol <= 2; re-save with protocol >= 3",
}


class PairBinImageError(CorruptImageError, FileFormatError):
    """An image of a pair file that cannot be decoded: a FileFormatError of the .bin file and a
    CorruptImageError (what image readers everywhere in bctkit raise for undecodable images)."""


class PairBinUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain data (lists, tuples, bytes, str, numbers, bools, None):
    every global and every persistent id is refused with a FileFormatError naming ``where``."""

    def __init__(self, file: io.BufferedIOBase, where: str) -> None:
        super().__init__(file, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> NoReturn:
        hint = _HINTS.get((module, name))
        extra = f" ({hint})" if hint else ""
        raise FileFormatError(
            f"{self.where}: refused: the pickle refers to the global {module}.{name}{extra}; a pair .bin "
            "may hold only a list of image bytes and a list of bools, and bctkit runs no code from files")

    def persistent_load(self, pid: Any) -> NoReturn:
        raise FileFormatError(f"{self.where}: refused: the pickle holds a persistent id; a pair .bin may "
                              "hold only a list of image bytes and a list of bools")


def _describe(obj: Any) -> str:
    return type(obj).__name__


def _check_structure(obj: Any, where: str) -> tuple[list[bytes], np.ndarray]:
    """The images and flags of a loaded pickle, or a FileFormatError saying what differs."""
    if not isinstance(obj, (list, tuple)) or len(obj) != 2:
        size = f" of length {len(obj)}" if isinstance(obj, (list, tuple)) else ""
        raise FileFormatError(f"{where}: the pickle holds a {_describe(obj)}{size}; expected a pair "
                              "(images, issame)")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise FileFormatError(f"{where}: images (the pair's first item) is a {_describe(bins)}; expected a "
                              "list of encoded images (bytes)")
    if not isinstance(issame, (list, tuple)):
        raise FileFormatError(f"{where}: issame (the pair's second item) is a {_describe(issame)}; "
                              "expected a list of bools")
    for i, b in enumerate(bins):
        if type(b) is not bytes:
            raise FileFormatError(f"{where}: image {i} is a {_describe(b)}; expected encoded image bytes")
    for p, flag in enumerate(issame):
        if type(flag) is not bool:
            raise FileFormatError(f"{where}: issame[{p}] is {flag!r} ({_describe(flag)}); expected True or "
                                  "False")
    if not issame:
        raise FileFormatError(f"{where}: the file holds no pairs")
    if len(bins) != 2 * len(issame):
        raise FileFormatError(f"{where}: {len(bins)} images for {len(issame)} pairs; expected exactly two "
                              f"images per pair ({2 * len(issame)})")
    return list(bins), np.array(issame, dtype=bool)


def load_pair_bin(path: str | Path) -> tuple[list[bytes], np.ndarray, str]:
    """(images, issame, sha256 of the file) of an insightface pair ``.bin``, read with
    :class:`PairBinUnpickler` and validated (see the module docstring); FileFormatError otherwise."""
    path = Path(path)
    where = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileFormatError(f"{where}: pair file not found") from None
    except OSError as exc:
        raise FileFormatError(f"{where}: cannot read the pair file ({exc.strerror or exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    stream = io.BytesIO(data)
    try:
        obj = PairBinUnpickler(stream, where).load()
    except FileFormatError:
        raise
    except Exception as exc:  # any failure of the pickle machinery means the bytes are not a pickle
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileFormatError(f"{where}: not a readable pickle ({reason[:200]}); expected an insightface "
                              "verification .bin") from None
    if stream.tell() != len(data):
        raise FileFormatError(f"{where}: {len(data) - stream.tell()} bytes follow the pickle's end (at byte "
                              f"{stream.tell()}); expected the file to be one pickle")
    bins, issame = _check_structure(obj, where)
    return bins, issame, digest


def pair_labels(issame: np.ndarray) -> np.ndarray:
    """Row labels of a pair set: ``2p`` for both images of a genuine pair p, ``2p`` and ``2p + 1`` for
    an impostor pair (int64, two rows per pair)."""
    issame = np.asarray(issame, dtype=bool)
    first = 2 * np.arange(len(issame), dtype=np.int64)
    return np.stack([first, first + (~issame)], axis=1).ravel()


class PairBinSource(DataSource):
    """The images of one insightface pair ``.bin`` file, in file order (module docstring: rows,
    labels). The whole file is read once at construction (LFW's is about 60 MB): its flags give the
    labels and its images are kept encoded, each decoded only when read."""

    format = "pairbin"

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        self.images, self.issame, self.sha256 = load_pair_bin(self.path)
        self._labels = pair_labels(self.issame)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def pairs(self) -> int:
        """Number of verification pairs (half the number of images)."""
        return len(self.issame)

    def read(self, i: int) -> Image.Image:
        if not 0 <= i < len(self.images):
            raise DataError(f"{self.path}: image {i} is out of range; the file holds {len(self.images)} "
                            "images")
        where = self.describe(i)
        try:
            return decode_image(self.images[i], where)
        except CorruptImageError as exc:
            raise PairBinImageError(str(exc)) from None

    def identity(self) -> dict[str, Any]:
        """The file's content hash (the file is read whole anyway), so a copy elsewhere matches."""
        return {"format": self.format, "images": len(self.images), "sha256": self.sha256[:32]}

    def describe(self, i: int) -> str:
        side = "first" if i % 2 == 0 else "second"
        return f"{self.path} image {i} (pair {i // 2}, {side} image)"

    def key(self, i: int) -> str:
        return f"{self.name}#{i}"

    def label_name(self, label: int) -> str:
        return f"{self.name} pair {label // 2}"

    @cached_property
    def genuine(self) -> int:
        """Number of genuine (same-person) pairs."""
        return int(self.issame.sum())
