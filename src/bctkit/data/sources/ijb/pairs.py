"""The 1:1 template pair list of an IJB dataset, checked against its source's templates."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bctkit.data.sources.ijb.meta import parse_int, read_text, records
from bctkit.data.sources.ijb.source import IJBSource
from bctkit.errors import DataError, FileFormatError


@dataclass(frozen=True)
class Pairs:
    """The 1:1 pair list: for pair p, ``first[p]`` and ``second[p]`` index the source's sorted
    ``template_ids``; ``genuine[p]`` is its label."""

    file: Path
    first: np.ndarray
    second: np.ndarray
    genuine: np.ndarray


def _pairs_slow(path: Path, text: str, known: np.ndarray) -> np.ndarray:
    """Line-by-line parse with exact errors: the reference the fast path falls back to."""
    rows = records(path, text, 3, "template1 template2 label")
    out = np.empty((len(rows), 3), dtype=np.int64)
    for i, (lineno, (a, b, lab)) in enumerate(rows):
        out[i] = (parse_int(path, lineno, "template1", a), parse_int(path, lineno, "template2", b),
                  parse_int(path, lineno, "label", lab))
        if out[i, 2] not in (0, 1):
            raise FileFormatError(f"{path}:{lineno}: label {lab!r}, expected 1 (genuine) or 0 (impostor)")
        for t in out[i, :2]:
            pos = np.searchsorted(known, t)
            if pos >= len(known) or known[pos] != t:
                raise DataError(f"{path}:{lineno}: template {t} has no images in the tid_mid file")
    return out


def _rows_of(known: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Position of each value in the sorted distinct ``known`` ids, -1 where absent: one table
    lookup per value when the ids span under 2^26, else a binary search."""
    out = np.full(values.shape, -1, dtype=np.int32)
    lo, hi = int(known[0]), int(known[-1])
    inside = (values >= lo) & (values <= hi)
    if hi - lo < 1 << 26:
        table = np.full(hi - lo + 1, -1, dtype=np.int32)
        table[known - lo] = np.arange(len(known), dtype=np.int32)
        out[inside] = table[values[inside] - lo]
    else:
        pos = np.searchsorted(known, values[inside])
        out[inside] = np.where(known[np.minimum(pos, len(known) - 1)] == values[inside], pos, -1)
    return out


def read_pairs(source: IJBSource) -> Pairs:
    """The 1:1 pair list of ``source``'s dataset, checked against its templates.

    numpy's C parser reads the file (15.7M lines of IJB-C in about a second); on any problem the
    file is read again line by line to name the line (a wrong field count, a non-integer, a label
    other than 0/1, a template with no images)."""
    path = source.pair_file
    known = source.template_ids
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty file warns; the line-by-line read names it
            data = np.loadtxt(path, dtype=np.int64, delimiter=" ", comments=None, ndmin=2, encoding="utf-8")
        ok = data.shape[1] == 3 and data.shape[0] > 0
    except FileNotFoundError:
        raise FileFormatError(f"{path}: file not found (the 1:1 template pair list)") from None
    except (ValueError, UnicodeDecodeError):
        ok = False
    if ok:
        first, second = _rows_of(known, data[:, 0]), _rows_of(known, data[:, 1])
        genuine = data[:, 2] == 1
        ok = bool((first >= 0).all() and (second >= 0).all() and (genuine | (data[:, 2] == 0)).all())
    if not ok:
        data = _pairs_slow(path, read_text(path), known)
        first, second = _rows_of(known, data[:, 0]), _rows_of(known, data[:, 1])
        genuine = data[:, 2] == 1
    del data
    if genuine.all() or not genuine.any():
        raise DataError(f"{path}: {int(genuine.sum())} genuine and {int((~genuine).sum())} impostor pairs; "
                        "1:1 verification needs both")
    return Pairs(path, first, second, genuine)
