"""bctkit's folders: the cache root, and the up-front check that an output folder can be written."""

from __future__ import annotations

import os
from pathlib import Path

from bctkit.errors import FileFormatError


def cache_home() -> Path:
    """Root of bctkit's caches (rendered glyphs, dataset scans): $BCTKIT_CACHE, else ~/.cache/bctkit."""
    return Path(os.environ.get("BCTKIT_CACHE") or "~/.cache/bctkit").expanduser()


def check_writable_dir(path: str | os.PathLike[str], what: str) -> None:
    """Refuse, before any work and without creating anything, an output folder ``path`` that could
    not be written: it (or its nearest existing parent, where it would be made) must be a writable
    folder. ``what`` names the option in the one-line error."""
    p = Path(path).expanduser().absolute()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        raise FileFormatError(f"{what} {path}: cannot be a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FileFormatError(f"{what} {path}: {existing} is not writable")
