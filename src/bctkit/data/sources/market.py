"""Person re-identification folders (Market-1501, DukeMTMC-reID) and a concatenating source.

Layout (both datasets, as distributed): ``root/bounding_box_test/`` (the gallery), ``root/query/``
(the queries), ``root/bounding_box_train/`` and, for Market-1501, ``root/gt_bbox/`` (hand-drawn boxes,
another set of queries). Every image's person id and camera come from its file name: the digits
before ``_c`` are the person id, the digits after it the camera:

- Market-1501: ``0002_c1s1_000451_03.jpg`` is person 2, camera 1 (``s1`` the video sequence,
  ``000451`` the frame, ``03`` the box); ``-1_c1s1_...`` is a junk box (person id -1) and
  ``0000_...`` a distractor (a box with no person of interest).
- DukeMTMC-reID: ``0005_c2_f0046985.jpg`` is person 5, camera 2, frame 46985.

A file whose name does not parse is a one-line DataError naming it. Labels are the indices of the
sorted distinct person ids of the folder; :meth:`ReIDFolderSource.label_name` gives the person id
as the file names write it (``0002``, ``-1``), which is how query and gallery identities are matched.

:class:`ConcatSource` puts sources one after the other (row i < len(first) is the first source's
image i), relabelled so that identities with the same name in different parts share a label.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bctkit.data.sources.base import DataSource, PathSource, PathTable
from bctkit.data.sources.imagefolder import image_extensions
from bctkit.errors import DataError

__all__ = ["ConcatSource", "ReIDFolderSource", "parse_reid_name", "reid_folders"]

_NAME = re.compile(r"^(-?\d+)_c(\d+)")
QUERY_SETS = ("query", "gt_bbox")


def parse_reid_name(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(person id, camera) from a Market-1501 / DukeMTMC file name; DataError naming the file."""
    name = os.path.basename(os.fspath(path))
    m = _NAME.match(name)
    if m is None:
        raise DataError(f"{path}: file name does not give a person id and camera; expected "
                        "'<person>_c<camera>...' such as 0002_c1s1_000451_03.jpg or 0005_c2_f0046985.jpg")
    return int(m.group(1)), int(m.group(2))


def pid_name(pid: int) -> str:
    """A person id as the file names write it: four digits, or -1 for junk."""
    return f"{pid:04d}" if pid >= 0 else str(pid)


class ReIDFolderSource(PathSource):
    """The images of one re-id folder (``root/sub``), sorted by file name, with ``pids`` and
    ``cams`` parsed from the names. Paths (and keys) are relative to ``root``."""

    format = "reid"

    def __init__(self, root: str | os.PathLike[str], sub: str, name: str | None = None) -> None:
        self.root = Path(root).expanduser()
        folder = self.root / sub
        if not folder.is_dir():
            raise DataError(f"{folder}: re-id folder not found; expected {self.root}/{sub}/ with images "
                            "named like 0002_c1s1_000451_03.jpg")
        exts = image_extensions()
        names = sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")
                       and os.path.splitext(e.name)[1].lower() in exts)
        if not names:
            raise DataError(f"{folder}: no images")
        parsed = [parse_reid_name(folder / n) for n in names]
        self.pids = np.asarray([p for p, _ in parsed], dtype=np.int64)
        self.cams = np.asarray([c for _, c in parsed], dtype=np.int64)
        self.distinct, labels = np.unique(self.pids, return_inverse=True)
        sizes = np.asarray([os.stat(folder / n).st_size for n in names], dtype=np.int64)
        super().__init__(self.root, PathTable.from_paths([f"{sub}/{n}" for n in names]), sizes,
                         labels.astype(np.int64), name or f"{self.root.name}/{sub}")

    def label_name(self, label: int) -> str:
        return pid_name(int(self.distinct[label])) if 0 <= label < len(self.distinct) else str(label)


def reid_folders(root: str | os.PathLike[str], query: str = "query"
                 ) -> tuple[ReIDFolderSource, ReIDFolderSource]:
    """(query source, gallery source) of a Market-1501 / DukeMTMC-reID root; ``query`` is
    ``query`` (the standard queries) or ``gt_bbox`` (Market-1501's hand-drawn boxes)."""
    if query not in QUERY_SETS:
        raise DataError(f"query set {query!r}: expected one of {', '.join(QUERY_SETS)}")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"{base}: re-id root not found; expected a folder holding query/ and "
                        "bounding_box_test/")
    return ReIDFolderSource(base, query), ReIDFolderSource(base, "bounding_box_test")


class ConcatSource(DataSource):
    """``parts`` one after the other; labels by identity name (``label_name``) across the parts:
    label k is the k-th name in sorted order. ``key``, ``read`` and ``describe`` are the parts'."""

    def __init__(self, parts: Sequence[DataSource], name: str | None = None) -> None:
        if not parts:
            raise DataError("ConcatSource needs at least one source")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        names = [np.asarray([p.label_name(int(v)) for v in np.unique(p.labels)], dtype=object)
                 for p in self.parts]
        self.names = sorted(set().union(*[set(n.tolist()) for n in names]))
        index = {n: k for k, n in enumerate(self.names)}
        pieces = []
        for part, part_names in zip(self.parts, names, strict=True):
            uniq, inv = np.unique(part.labels, return_inverse=True)
            mapped = np.asarray([index[n] for n in part_names], dtype=np.int64)
            pieces.append(mapped[inv] if len(uniq) else np.zeros(0, np.int64))
        self._labels = np.concatenate(pieces).astype(np.int64)
        self.name = name or " + ".join(p.name for p in self.parts)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def _locate(self, i: int) -> tuple[DataSource, int]:
        if not 0 <= i < len(self._labels):
            raise IndexError(f"{self.name}: image {i} out of range [0, {len(self._labels)})")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k], i - int(self.offsets[k])

    def read(self, i: int) -> Image.Image | np.ndarray:
        part, j = self._locate(i)
        return part.read(j)

    def identity(self) -> dict[str, Any]:
        return {"concat": [p.fingerprint() for p in self.parts]}

    def describe(self, i: int) -> str:
        part, j = self._locate(i)
        return part.describe(j)

    def key(self, i: int) -> str:
        part, j = self._locate(i)
        return part.key(j)

    @cached_property
    def _shape(self) -> tuple[int, int, int] | None:
        shapes = {p.stored_shape() for p in self.parts}
        return shapes.pop() if len(shapes) == 1 else None

    def stored_shape(self) -> tuple[int, int, int] | None:
        return self._shape

    def label_name(self, label: int) -> str:
        return self.names[label] if 0 <= label < len(self.names) else str(label)
