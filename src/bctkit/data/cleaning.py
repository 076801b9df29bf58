"""Leaving out what a file dataset cannot train on: undecodable images (``data.skip_corrupt``) and
identities with too few images (``data.min_images``). Both return a view of the source and record
what they left out in ``notes``, which the run's report shows."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from bctkit.data.sources.base import DataSource
from bctkit.engine.loader import Feed
from bctkit.errors import DataError
from bctkit.storage import atomic_path, cache_home

__all__ = ["drop_corrupt", "drop_small_identities"]

CHECK_VERSION = 1


def drop_corrupt(source: DataSource, workers: int, progress: bool, notes: dict[str, Any],
                 key: str = "") -> DataSource:
    """``source`` without its undecodable images. Every image is decoded once (in ``workers``
    loader processes); the list of bad ones is cached by the source's fingerprint, so later runs
    pay nothing. ``notes[key + "skipped_corrupt"]`` counts them, with a few examples."""
    path = cache_home() / "sources" / f"corrupt-v{CHECK_VERSION}-{source.fingerprint()}.npy"
    bad = None
    if path.is_file():
        try:
            bad = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            warnings.warn(f"ignoring corrupt image-check cache {path} ({exc})", stacklevel=2)
    if bad is None:
        bad = Feed(source, workers=workers).find_corrupt(progress=progress)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, bad)
        except OSError as exc:
            warnings.warn(f"could not cache the image check at {path} ({exc})", stacklevel=2)
    notes[f"{key}skipped_corrupt"] = int(len(bad))
    if not len(bad):
        return source
    notes[f"{key}skipped_examples"] = [source.describe(int(i)) for i in bad[:5]]
    keep = np.setdiff1d(np.arange(len(source)), bad)
    if not len(keep):
        raise DataError(f"{source.name}: none of its {len(source)} images can be decoded")
    view = source.subset(keep)
    view.name = f"{source.name} ({len(bad)} corrupt images skipped)"
    return view


def drop_small_identities(source: DataSource, min_images: int, notes: dict[str, Any]) -> DataSource:
    """``source`` without the identities that have fewer than ``min_images`` images;
    ``notes["dropped_identities"]`` / ``["dropped_images"]`` count what went."""
    _, inverse, counts = np.unique(source.labels, return_inverse=True, return_counts=True)
    small = counts[inverse] < min_images
    notes["dropped_identities"] = int((counts < min_images).sum())
    notes["dropped_images"] = int(small.sum())
    if not small.any():
        return source
    view = source.subset(np.flatnonzero(~small))
    view.name = (f"{source.name} ({notes['dropped_identities']} identities with < {min_images} images "
                 "dropped)")
    return view
