"""``list``: a text or CSV file with one ``path label`` per line.

- Separator: CSV files (``.csv``) split each line at its last comma, other files at the last run
  of whitespace, so paths may contain spaces (text) or commas (CSV, but then not in the label).
- Paths are relative to the list file's folder (absolute paths are kept as they are), or to
  ``root`` when it is given: then every path is taken under ``root``, a leading ``/`` included.
  Places365's lists write ``/a/abbey/00000000.jpg 0`` relative to the data root, so
  ``{file: places365_train_standard.txt, root: /data/places365/data_large}`` reads them (and
  ``{file: places365_val.txt, root: /data/places365/val_large}`` the validation list's
  ``Places365_val_00000001.jpg 165`` lines).
- Labels are non-negative integers, used as given (they need not be contiguous).
- Blank lines and lines starting with ``#`` are skipped; a first line ``path label`` / ``path,label``
  is a header.

The parsed list (paths, labels, file sizes) is cached by the list file's size, mtime and edges and
by ``root``, so a second run over millions of lines starts at once. Every listed file is checked to
exist when the list is parsed; the source's identity is a hash of the list's paths, labels and file sizes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

from bctkit.data.sources.base import PathSource, PathTable, listed_file_size
from bctkit.data.sources.scan_cache import cached_scan
from bctkit.errors import DataError

__all__ = ["ListConfig", "ListSource", "parse_list"]

SCAN_VERSION = 1


class ListConfig(BaseModel):
    """``data.list`` / ``data.eval.list``."""

    model_config = ConfigDict(extra="forbid")

    file: str
    root: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset_root(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Dumps leave ``root`` out when unset, so configs written before it existed still match."""
        data = handler(self)
        if data.get("root") is None:
            data.pop("root", None)
        return data


def parse_list(file: Path, root: Path | None = None) -> dict[str, np.ndarray]:
    """Parse a list file into arrays (path blob + offsets, labels, file sizes); a one-line
    DataError naming ``file:line`` for a line without a label, a non-integer or negative label, or
    a missing file. With ``root``, paths are relative to it (a leading ``/`` stripped), else to the
    list's folder."""
    csv = file.suffix.lower() == ".csv"
    base = file.parent if root is None else root
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
        if root is not None:
            path = path.lstrip("/")
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(f"{file}:{lineno}: label {label_text!r} is not an integer") from None
        if label < 0:
            raise DataError(f"{file}:{lineno}: label {label} is negative; labels must be >= 0")
        sizes.append(listed_file_size(base / path, f"{file}:{lineno}"))
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

    def __init__(self, file: str | os.PathLike[str], name: str | None = None,
                 root: str | os.PathLike[str] | None = None) -> None:
        self.file = Path(file).expanduser()
        if not self.file.is_file():
            raise DataError(f"{self.file}: list file not found (data.list.file)")
        self.root = None if root is None else Path(root).expanduser().resolve()
        if self.root is not None and not self.root.is_dir():
            raise DataError(f"{self.root}: folder not found (data.list.root, where {self.file.name}'s "
                            "paths are)")
        params = {"version": SCAN_VERSION, "root": None if self.root is None else str(self.root)}
        arrays, self.from_cache = cached_scan("list", [self.file], params,
                                              lambda: parse_list(self.file, self.root))
        super().__init__(self.file.parent if self.root is None else self.root,
                         PathTable(arrays["blob"], arrays["offsets"]), arrays["sizes"], arrays["labels"],
                         name or f"list {self.file.name}")
