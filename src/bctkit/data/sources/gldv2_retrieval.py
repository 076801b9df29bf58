"""Google Landmarks Dataset v2's retrieval test as released: ``ROOT/test/a/b/c/<id>.jpg`` (queries),
``ROOT/index/a/b/c/<id>.jpg`` (the index; a, b, c the id's first three characters),
``ROOT/retrieval_solution_v2.1.csv`` (the ground truth) and the index list ``ROOT/index.csv`` (header
``id``, one id per line; without it, ``index/`` is scanned for ``*.jpg``, ids sorted).

The solution file has the header ``id,images,Usage`` and one row per test image: its id, the
space-separated ids of its relevant index images (quoted) and its usage, ``Public`` or ``Private``
(scored on the challenge's two leaderboards), or ``Ignored`` with images ``None`` (test images with no
landmark of the index). Only Public and Private rows are queries. A malformed row, an id listed twice,
a relevant id not in the index or a query whose image is missing is a one-line DataError naming the
file and line.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bctkit.data.sources.base import PathSource, PathTable
from bctkit.errors import DataError

__all__ = ["GLDv2Solution", "USAGES", "gldv2_source", "image_path", "read_index_ids", "read_solution"]

SOLUTION = "retrieval_solution_v2.1.csv"
INDEX_LIST = "index.csv"
USAGES = ("Public", "Private")


@dataclass(frozen=True)
class GLDv2Solution:
    """The queries (Public / Private rows, file order): ids, usage and relevant index rows."""

    ids: list[str]
    usage: list[str]
    relevant: list[np.ndarray]
    lines: list[int]


def image_path(sub: str, image_id: str) -> str:
    """``sub/a/b/c/<id>.jpg``, the release's layout."""
    return f"{sub}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def _check_id(image_id: str, where: str) -> str:
    if len(image_id) < 3 or not image_id.isalnum():
        raise DataError(f"{where}: id {image_id!r} is not an image id (letters and digits, at least three)")
    return image_id


def read_index_ids(root: Path) -> tuple[list[str], str]:
    """The index ids (``index.csv`` order, else the sorted ids of ``index/**/*.jpg``) and where they
    came from, for messages."""
    listed = root / INDEX_LIST
    if listed.is_file():
        with open(listed, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        if not rows or not rows[0] or rows[0][0].strip() != "id":
            raise DataError(f"{listed}:1: expected the header 'id'")
        ids = []
        for no, row in enumerate(rows[1:], 2):
            if row and row[0].strip():
                ids.append(_check_id(row[0].strip(), f"{listed}:{no}"))
        return ids, str(listed)
    folder = root / "index"
    if not folder.is_dir():
        raise DataError(f"{root}: neither {INDEX_LIST} nor index/ found (GLDv2's retrieval index)")
    ids = sorted(os.path.splitext(n)[0] for _, _, files in os.walk(folder) for n in files
                 if n.endswith(".jpg") and not n.startswith("."))
    return ids, str(folder)


def read_solution(file: Path, index: dict[str, int], index_where: str) -> GLDv2Solution:
    """The Public and Private rows of ``file``, relevant ids mapped to rows of ``index``."""
    ids: list[str] = []
    usage: list[str] = []
    relevant: list[np.ndarray] = []
    lines: list[int] = []
    seen: set[str] = set()
    with open(file, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or [c.strip() for c in rows[0]] != ["id", "images", "Usage"]:
        raise DataError(f"{file}:1: expected the header 'id,images,Usage'")
    for no, row in enumerate(rows[1:], 2):
        if not row:
            continue
        where = f"{file}:{no}"
        if len(row) != 3:
            raise DataError(f"{where}: expected 3 fields (id, images, Usage), got {len(row)}")
        qid, images, use = (c.strip() for c in row)
        _check_id(qid, where)
        if qid in seen:
            raise DataError(f"{where}: test image {qid} has a second row")
        seen.add(qid)
        if use == "Ignored":
            continue
        if use not in USAGES:
            raise DataError(f"{where}: Usage {use!r}; expected Public, Private or Ignored")
        names = images.split()
        if not names or names == ["None"]:
            raise DataError(f"{where}: a {use} query with no relevant images")
        rows_of = []
        for name in names:
            if name not in index:
                raise DataError(f"{where}: id {name} is not in the index ({index_where})")
            rows_of.append(index[name])
        if len(set(rows_of)) != len(rows_of):
            raise DataError(f"{where}: an index id is listed twice for test image {qid}")
        ids.append(qid)
        usage.append(use)
        relevant.append(np.asarray(rows_of, dtype=np.int64))
        lines.append(no)
    if not ids:
        raise DataError(f"{file}: no Public or Private rows: nothing to evaluate")
    return GLDv2Solution(ids, usage, relevant, lines)


def _sizes(root: Path, paths: list[str], where: Callable[[int], str]) -> np.ndarray:
    sizes = np.empty(len(paths), dtype=np.int64)
    for i, rel in enumerate(paths):
        try:
            sizes[i] = os.stat(root / rel).st_size
        except FileNotFoundError:
            raise DataError(f"{where(i)}: image {root / rel} not found") from None
    return sizes


def gldv2_source(root: str | os.PathLike[str]) -> tuple[PathSource, GLDv2Solution, int]:
    """(images: the queries then the index, the solution, index size) of a GLDv2 root."""
    base = Path(root).expanduser()
    solution_file = base / SOLUTION
    if not solution_file.is_file():
        raise DataError(f"{solution_file}: not found; expected {base} to hold {SOLUTION}, test/ and index/")
    index_ids, where = read_index_ids(base)
    index = {image_id: row for row, image_id in enumerate(index_ids)}
    if len(index) != len(index_ids):
        raise DataError(f"{where}: an index id is listed twice")
    sol = read_solution(solution_file, index, where)
    queries = [image_path("test", q) for q in sol.ids]
    indexed = [image_path("index", i) for i in index_ids]
    sizes = np.concatenate([
        _sizes(base, queries, lambda i: f"{solution_file}:{sol.lines[i]}: query {sol.ids[i]}"),
        _sizes(base, indexed, lambda i: f"{where}: index image {index_ids[i]}")])
    paths = PathTable.from_paths(queries + indexed)
    return PathSource(base, paths, sizes, np.zeros(len(sizes), np.int64), f"{base.name} (GLDv2 retrieval)"), \
        sol, len(index_ids)
