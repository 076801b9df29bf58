"""A cache of what was scanned from a dataset's index files (labels, offsets, paths), so that a
second run over a million-image dataset starts in a second instead of rereading every header.

An entry is ``<cache>/sources/<kind>-<key>.npz`` (numpy arrays only, read with allow_pickle=False),
keyed by the scanned files' size, mtime and a hash of their first and last MiB, the scanner's
version and its parameters. A corrupt entry is rebuilt with a warning; entries are written
atomically.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bctkit.data.sources.base import file_signature
from bctkit.storage import atomic_path, cache_home

__all__ = ["cached_scan", "scan_cache_path"]


def scan_cache_path(kind: str, files: list[Path], params: dict[str, Any]) -> Path:
    """Where the scan of ``files`` by scanner ``kind`` with ``params`` is cached."""
    ident = {"kind": kind, "files": [file_signature(f) for f in files], "params": params}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
    return cache_home() / "sources" / f"{kind}-{key}.npz"


def cached_scan(kind: str, files: list[Path], params: dict[str, Any],
                build: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], bool]:
    """(arrays, whether they came from the cache): ``build()``'s arrays, computed once per
    (files, params) and then read back from the cache."""
    path = scan_cache_path(kind, files, params)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}, True
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            warnings.warn(f"{kind}: ignoring corrupt scan cache {path} ({exc})", stacklevel=2)
    arrays = build()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    except OSError as exc:  # a read-only or full cache folder costs a rescan next time, nothing else
        warnings.warn(f"{kind}: could not write the scan cache {path} ({exc})", stacklevel=2)
    return arrays, False
