"""``list``: a text or CSV file with one ``path label`` per line.

- Separator: CSV files (``.csv``) split each line at its last comma, other files at the last run
  of whitespace, so paths may contain spaces (text) or commas (CSV, but then not in the label).
- Paths are relative to the list file's folder (absolute paths are kept as they are).
- Labels are non-negative integers, used as given (they need not be contiguous).
- Blank lines and lines starting with ``#`` are skipped; a first line ``path label`` / ``path,label``
  is a header.

The parsed list (paths, labels, file sizes) is cached by the list file's size, mtime and edges, so a
second run over millions of lines starts at once. Every listed file is checked to exist when the
list is parsed; the source's identity is a hash of the list's paths, labels and file sizes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from bctkit.data.sources.base import PathSource, PathTable
from bctkit.data.sources.scan_cache import cached_scan
from bctkit.errors import DataError

__all__ = ["ListConfig", "ListSource", "parse_list"]

SCAN_VERSION = 1


class ListConfig(BaseModel):
    """``data.list`` / ``data.eval.list``."""

    model_config = ConfigDict(extra="forbid")

    file: str


def parse_list(file: Path) -> dict[str, np.ndarray]:
    """Parse a list file into arrays (path blob + offsets, labels, file sizes); a one-line
    DataError naming ``file:line`` for a line without a label, a non-integer or negative label, or
    a missing file."""
    csv = file.suffix.lower() == ".csv"
    base = file.parent
    paths: list[str] = []
    labels: list[int] = []
    sizes: list[int] = []
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    first = True
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(",", 1) if csv else line.rsplit(None, 1)
        if first and [p.strip().lower() for p in parts] == ["path", "label"]:
            first = False
            continue
        first = False
        if len(parts) != 2 or not parts[0].strip():
            sep = "a comma" if csv else "whitespace"
            raise DataError(f"{file}:{lineno}: expected 'path label' ({sep} before the label), got {line!r}")
        path, label_text = parts[0].strip(), parts[1].strip()
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(f"{file}:{lineno}: label {label_text!r} is not an integer") from None
        if label < 0:
            raise DataError(f"{file}:{lineno}: label {label} is negative; labels must be >= 0")
        full = base / path
        try:
            sizes.append(os.stat(full).st_size)
        except FileNotFoundError:
            raise DataError(f"{file}:{lineno}: {full}: image file not found") from None
        paths.append(path)
        labels.append(label)
    if not paths:
        raise DataError(f"{file}: no 'path label' lines")
    table = PathTable.from_paths(paths)
    return {"blob": table.blob, "offsets": table.offsets, "labels": np.asarray(labels, dtype=np.int64),
            "sizes": np.asarray(sizes, dtype=np.int64)}


class ListSource(PathSource):
    """See the module docstring."""

    format = "list"

    def __init__(self, file: str | os.PathLike[str], name: str | None = None) -> None:
        self.file = Path(file).expanduser()
        if not self.file.is_file():
            raise DataError(f"{self.file}: list file not found (data.list.file)")
        arrays, self.from_cache = cached_scan("list", [self.file], {"version": SCAN_VERSION},
                                              lambda: parse_list(self.file))
        super().__init__(self.file.parent, PathTable(arrays["blob"], arrays["offsets"]), arrays["sizes"],
                         arrays["labels"], name or f"list {self.file.name}")
