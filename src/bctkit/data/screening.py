"""Screening a dataset before anything trains: leaving out what it cannot train on (undecodable
images with ``data.skip_corrupt``, identities with too few images with ``data.min_images``; both
return a view and record what they left out in ``notes``, which the report shows) and refusing, by
name, identities the allocation or the evaluation protocol cannot use."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from bctkit.data.sources.base import DataSource
from bctkit.data.workers import find_corrupt
from bctkit.errors import DataError
from bctkit.storage import atomic_path, cache_home

__all__ = ["check_identities", "describe_notes", "drop_corrupt", "drop_small_identities"]

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
        bad = find_corrupt(source, workers, progress=progress)
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


def check_identities(pool: DataSource, scenario: str, held_out: DataSource, gallery_per_class: int) -> None:
    """Refuse, naming the identity, a pool identity with one image when the allocation splits
    every identity's images (the old and new models would silently share it), and a held-out
    identity with no image left to probe after its ``gallery_per_class`` gallery images."""
    if scenario.endswith("-data"):
        classes, counts = np.unique(pool.labels, return_counts=True)
        if counts.min() < 2:
            k = int(np.argmin(counts))
            raise DataError(
                f"{pool.name}: identity {pool.label_name(int(classes[k]))!r} has 1 image; the {scenario} "
                f"allocation splits each identity's images between the old and the new training set and "
                f"needs at least 2 ({int((counts < 2).sum())} identities have 1): set data.min_images: 2"
            )
    classes, counts = np.unique(held_out.labels, return_counts=True)
    if len(counts) and counts.min() <= gallery_per_class:
        k = int(np.argmin(counts))
        raise DataError(
            f"{held_out.name}: identity {held_out.label_name(int(classes[k]))!r} has {int(counts[k])} "
            f"image(s); evaluation needs more than evaluation.gallery_per_class={gallery_per_class} "
            f"(gallery) per identity to leave a probe ({int((counts <= gallery_per_class).sum())} "
            "identities have too few)"
        )


def describe_notes(notes: dict[str, Any]) -> str:
    """What loading left out, as a clause of the report's dataset line ('' when nothing)."""
    parts = []
    for prefix in ("", "test_", "validation_"):
        if notes.get(f"{prefix}skipped_corrupt"):
            what = f"{prefix[:-1]} source" if prefix else "training source"
            parts.append(f"{notes[f'{prefix}skipped_corrupt']} undecodable images skipped ({what})")
    if notes.get("dropped_identities"):
        parts.append(f"{notes['dropped_identities']} identities with too few images dropped "
                     f"({notes['dropped_images']} images)")
    return f"; {', '.join(parts)}" if parts else ""
