"""Readers of IJB's metadata text: UTF-8 files of space-separated records and CSV rows, with one-line
errors that name the file and line; a fast path through numpy's C parser for the big tables."""

from __future__ import annotations

import csv
import hashlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bctkit.errors import FileFormatError


def read_text(path: Path, digests: dict[str, str] | None = None) -> str:
    """The UTF-8 text of ``path``; its bytes' hash goes into ``digests`` under the file name."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileFormatError(f"{path}: file not found (IJB layout: <root>/meta/<name>_...)") from None
    if digests is not None:
        digests[path.name] = hashlib.sha256(data).hexdigest()[:32]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def records(path: Path, text: str, fields: int, what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line, split at single spaces; FileFormatError naming
    the line when a line has another number of fields."""
    out = []
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != fields:
            raise FileFormatError(f"{path}:{lineno}: {len(parts)} fields, expected {fields} ({what}) "
                                  "separated by single spaces")
        out.append((lineno, parts))
    if not out:
        raise FileFormatError(f"{path}: no records; expected lines '{what}'")
    return out


def fast_table(text: str, fields: int, dtype: type) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(first field of each record, the other fields as an array, line numbers) through numpy's C
    parser; None when anything is off (the line-by-line reader then names the line)."""
    names, lines = [], []
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if line:
            names.append(line.split(" ", 1)[0])
            lines.append(lineno)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = np.loadtxt(io.StringIO(text), dtype=dtype, delimiter=" ", comments=None, ndmin=2,
                               converters={0: lambda _: 0})
    except ValueError:
        return None
    if table.shape != (len(names), fields) or not np.isfinite(table).all():
        return None
    return names, table[:, 1:], np.asarray(lines, dtype=np.int64)


def csv_rows(path: Path, reader: Any) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each CSV row; FileFormatError naming the line on broken quoting."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise FileFormatError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
        yield reader.line_num, row


def parse_int(path: Path, lineno: int, field: str, text: str) -> int:
    """``text`` as an integer, else a FileFormatError naming the line and the field."""
    try:
        return int(text)
    except ValueError:
        raise FileFormatError(f"{path}:{lineno}: {field} {text!r} is not an integer") from None


def parse_float(path: Path, lineno: int, field: str, text: str) -> float:
    """``text`` as a finite number, else a FileFormatError naming the line and the field."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise FileFormatError(f"{path}:{lineno}: {field} {text!r} is not a finite number")
    return value
