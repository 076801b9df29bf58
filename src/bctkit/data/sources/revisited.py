"""Revisited Oxford and Paris (Radenovic et al., CVPR 2018) as the authors distribute them, and the
R1M distractors.

Layout: ``ROOT/gnd_roxford5k.pkl`` (or ``gnd_rparis6k.pkl``) and ``ROOT/jpg/<name>.jpg`` for every
name of the pickle's ``imlist`` (the database) and ``qimlist`` (the queries). The pickle is a dict
``{"imlist": [...], "qimlist": [...], "gnd": [{"bbx": [x1, y1, x2, y2], "easy": [...], "hard": [...],
"junk": [...]}, ...]}``, one ``gnd`` entry per query, the lists holding database indices. It is read
by :func:`bctkit.storage.safe_pickle.load_pickle` with ``arrays=True``: plain data plus numeric numpy
arrays and scalars (the authors' code wraps every list in ``np.array``, so a release may store them
either way; numeric arrays carry no code), and nothing else: a pickle naming any other global is
refused in one line before anything of it runs.

Queries are cropped to their box as the authors' code (cirtorch, revisitop's examples) does it, with
PIL's ``Image.crop(bbx)``, which rounds each coordinate with Python's ``round`` (half to even) and
keeps columns ``x1 .. x2 - 1`` and rows ``y1 .. y2 - 1``. A box that, rounded, is empty or reaches
outside its image (where PIL would pad with black) is a one-line error naming the query and the file.

Distractors (R1M, or any other set): a folder, searched recursively for images (sorted by relative
path), or a list file with one image path per line, relative to the list's folder (or, when the first
is not there, to its ``jpg/`` subfolder: ``revisitop1m.txt`` next to ``jpg/``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bctkit.data.sources.base import DataSource, PathSource, PathTable, decode_image
from bctkit.data.sources.imagefolder import image_extensions
from bctkit.data.sources.scan_cache import cached_scan
from bctkit.errors import DataError, FileFormatError
from bctkit.storage.safe_pickle import load_pickle

__all__ = ["GND_FILES", "RevisitedGroundTruth", "RevisitedSource", "crop_box", "distractor_source",
           "read_gnd"]

GND_FILES = {"roxford5k": "gnd_roxford5k.pkl", "rparis6k": "gnd_rparis6k.pkl"}
LISTS = ("easy", "hard", "junk")


@dataclass(frozen=True)
class RevisitedGroundTruth:
    """A gnd pickle's content: database and query names, each query's box and its easy, hard and
    junk database indices (int64 arrays, as listed)."""

    file: str
    imlist: list[str]
    qimlist: list[str]
    bbx: np.ndarray
    easy: list[np.ndarray]
    hard: list[np.ndarray]
    junk: list[np.ndarray]


def _names(value: Any, where: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise FileFormatError(f"{where}: expected a list of image names (non-empty strings)")
    return list(value)


def _indices(value: Any, n_db: int, where: str) -> np.ndarray:
    arr = np.asarray(value) if isinstance(value, list | tuple | np.ndarray) else None
    if arr is None or arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise FileFormatError(f"{where}: expected a list of database indices (integers)")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= n_db)]
    if bad.size:
        raise FileFormatError(f"{where}: index {int(bad[0])} is outside the database [0, {n_db})")
    return arr


def _box(value: Any, where: str) -> np.ndarray:
    arr = np.asarray(value) if isinstance(value, list | tuple | np.ndarray) else None
    if arr is None or arr.shape != (4,) or not np.issubdtype(arr.dtype, np.number) \
            or not np.isfinite(arr.astype(np.float64)).all():
        raise FileFormatError(f"{where}: expected [x1, y1, x2, y2], four finite numbers")
    return arr.astype(np.float64)


def read_gnd(path: str | os.PathLike[str]) -> RevisitedGroundTruth:
    """The ground truth in ``path`` (module docstring), checked field by field: a one-line
    FileFormatError naming the file and the field."""
    p = Path(path)
    data = load_pickle(p, arrays=True)
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise FileFormatError(f"{p}: expected a dict with 'imlist', 'qimlist' and 'gnd'")
    imlist = _names(data["imlist"], f"{p}: imlist")
    qimlist = _names(data["qimlist"], f"{p}: qimlist")
    gnd = data["gnd"]
    if not isinstance(gnd, list | tuple) or len(gnd) != len(qimlist):
        raise FileFormatError(f"{p}: gnd: expected a list with one entry per query ({len(qimlist)})")
    boxes, lists = [], {k: [] for k in LISTS}
    for i, entry in enumerate(gnd):
        if not isinstance(entry, dict) or "bbx" not in entry:
            raise FileFormatError(f"{p}: gnd[{i}]: expected a dict with 'bbx', 'easy', 'hard' and 'junk'")
        boxes.append(_box(entry["bbx"], f"{p}: gnd[{i}].bbx"))
        for k in LISTS:
            if k not in entry:
                raise FileFormatError(f"{p}: gnd[{i}]: no '{k}' list")
            lists[k].append(_indices(entry[k], len(imlist), f"{p}: gnd[{i}].{k}"))
    return RevisitedGroundTruth(str(p), imlist, qimlist, np.asarray(boxes).reshape(-1, 4), **lists)


def crop_box(bbx: np.ndarray, size: tuple[int, int], where: str) -> tuple[int, int, int, int]:
    """``bbx`` rounded as ``PIL.Image.crop`` rounds it, checked to be a non-empty box inside an image
    of ``size`` (width, height); DataError naming ``where`` otherwise."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in bbx)
    w, h = size
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise DataError(f"{where}: box {[float(v) for v in bbx]} (rounded {[x0, y0, x1, y1]}) is empty or "
                        f"outside the {w}x{h} image")
    return x0, y0, x1, y1


def _scan_folder(folder: Path) -> list[str]:
    exts = image_extensions()
    found = []
    for base, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(base, folder)
        found += [n if rel == "." else f"{rel}/{n}" for n in files
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in exts]
    return sorted(found)


def _read_list(file: Path) -> tuple[Path, list[str]]:
    lines = [(no, ln.strip()) for no, ln in enumerate(file.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(no, ln) for no, ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise DataError(f"{file}: no image paths")
    base = file.parent
    if not (base / lines[0][1]).is_file() and (base / "jpg" / lines[0][1]).is_file():
        base = base / "jpg"
    return base, [ln for _, ln in lines]


def distractor_source(path: str | os.PathLike[str]) -> PathSource:
    """The distractor images at ``path``: a folder (recursive) or a list file (module docstring)."""
    p = Path(path).expanduser()
    if p.is_dir():
        folder, paths = p, _scan_folder(p)
        if not paths:
            raise DataError(f"{p}: no images in the distractor folder")
        sizes = np.asarray([os.stat(folder / r).st_size for r in paths], dtype=np.int64)
    elif p.is_file():
        folder, paths = _read_list(p)

        def build() -> dict[str, np.ndarray]:
            sizes = []
            for no, rel in enumerate(paths, 1):
                try:
                    sizes.append(os.stat(folder / rel).st_size)
                except FileNotFoundError:
                    raise DataError(f"{p}:{no}: {folder / rel}: image file not found") from None
            return {"sizes": np.asarray(sizes, dtype=np.int64)}

        sizes = cached_scan("distractors", [p], {"version": 1, "base": str(folder)}, build)[0]["sizes"]
    else:
        raise DataError(f"{p}: distractors not found (a folder of images or a list file)")
    return PathSource(folder, PathTable.from_paths(paths), sizes, np.zeros(len(paths), np.int64),
                      f"distractors {p.name}")


class RevisitedSource(DataSource):
    """Rows ``0 .. nq-1``: the queries cropped to their boxes; then the database images (``imlist``
    order); then the distractors, if any. Labels are all 0 (the ground truth is per query)."""

    def __init__(self, root: str | os.PathLike[str], gnd: RevisitedGroundTruth,
                 distractors: PathSource | None = None, name: str | None = None) -> None:
        self.root = Path(root).expanduser()
        self.gnd = gnd
        self.distractors = distractors
        self.name = name or self.root.name
        self._dir = self.root / "jpg"
        sizes = []
        for field, names in (("qimlist", gnd.qimlist), ("imlist", gnd.imlist)):
            for i, n in enumerate(names):
                try:
                    sizes.append(os.stat(self._dir / f"{n}.jpg").st_size)
                except FileNotFoundError:
                    raise DataError(f"{gnd.file}: {field}[{i}] {n!r}: image {self._dir / n}.jpg not found"
                                    ) from None
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self.boxes = [self._query_box(i) for i in range(len(gnd.qimlist))]
        self._labels = np.zeros(len(gnd.qimlist) + len(gnd.imlist) + len(distractors or ()), np.int64)

    def _query_box(self, i: int) -> tuple[int, int, int, int]:
        path = self._dir / f"{self.gnd.qimlist[i]}.jpg"
        try:
            with Image.open(path) as img:
                size = img.size
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{path}: cannot read the query image ({exc})") from None
        return crop_box(self.gnd.bbx[i], size, f"{self.gnd.file}: query {i} ({self.gnd.qimlist[i]}, {path})")

    @property
    def n_query(self) -> int:
        return len(self.gnd.qimlist)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def _where(self, i: int) -> tuple[str, str]:
        """(key, path) of a query or database row."""
        nq = self.n_query
        if i < nq:
            return f"query/{self.gnd.qimlist[i]}", str(self._dir / f"{self.gnd.qimlist[i]}.jpg")
        name = self.gnd.imlist[i - nq]
        return f"jpg/{name}.jpg", str(self._dir / f"{name}.jpg")

    def read(self, i: int) -> Image.Image:
        n_own = self.n_query + len(self.gnd.imlist)
        if i >= n_own:
            return self.distractors.read(i - n_own)  # type: ignore[union-attr]
        path = self._where(i)[1]
        img = decode_image(path, path)
        if i >= self.n_query:
            return img
        box = crop_box(self.gnd.bbx[i], img.size, f"{self.gnd.file}: query {i} ({path})")
        return img.crop(box)

    @cached_property
    def _identity(self) -> dict[str, Any]:
        h = hashlib.sha256(Path(self.gnd.file).read_bytes())
        h.update(self._sizes.tobytes())
        return {"format": "revisited", "ground_truth_and_images": h.hexdigest()[:32],
                "distractors": None if self.distractors is None else self.distractors.fingerprint()}

    def identity(self) -> dict[str, Any]:
        return self._identity

    def describe(self, i: int) -> str:
        n_own = self.n_query + len(self.gnd.imlist)
        if i >= n_own:
            return self.distractors.describe(i - n_own)  # type: ignore[union-attr]
        path = self._where(i)[1]
        return f"{path} cropped to {list(self.boxes[i])}" if i < self.n_query else path

    def key(self, i: int) -> str:
        n_own = self.n_query + len(self.gnd.imlist)
        if i >= n_own:
            return f"distractors/{self.distractors.key(i - n_own)}"  # type: ignore[union-attr]
        return self._where(i)[0]
