"""Transform a gallery: rewrite every item of the old version through a learned transformation h
(FCT / FastFill; :mod:`bctkit.models.transformation`) as a new version, reading only the stored
vectors (no image). The version is h's fingerprint composed with the old one
(:attr:`~bctkit.models.transformation.LoadedTransformation.version`); with FastFill's uncertainty
each item's predicted sigma^2 is kept as its prior, which ``backfill --order uncertainty`` reads.

Crash safety: killed at any point and run again, the store ends bit for bit as an uninterrupted
transform leaves it, on every backend, without relying on the order of commits. The plan is the
items of the old version or already of h's, in insertion order, cut into fixed batches; a batch
holding an item still to do is recomputed whole in shape, the rows already done (their old vectors
are gone) given zeros. h in eval mode computes each row from that row alone (linear layers,
BatchNorm with its running statistics, ReLU), so a row's result depends on its input, the batch's
shape and its place in it, all of which a restart reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from bctkit.gallery.backfill_plan import PLAIN_TRANSFORM_ORDER, TRANSFORM_ORDER, check_count
from bctkit.gallery.checks import GalleryError
from bctkit.gallery.interface import Gallery
from bctkit.models.transformation import LoadedTransformation

__all__ = ["TRANSFORM_ORDER", "TransformRefused", "TransformResult", "check_transform", "transform"]


class TransformRefused(GalleryError):
    """A transformation that does not fit the gallery (another old version, another size)."""


@dataclass
class TransformResult:
    """What one transform call did: items transformed now, already before, batches, the version."""

    transformed: int
    already: int
    batches: int
    version: str


def check_transform(store: Gallery, h: LoadedTransformation) -> None:
    """Refuse, in one line naming both fingerprints, a transformation that does not fit ``store``."""
    versions = store.versions()
    old = h.old_fingerprint
    if h.config.side_dim:
        raise TransformRefused(f"transform {h.fingerprint}: takes {h.config.side_dim}-d side information "
                               "per item, which a gallery does not store; use a transformation trained "
                               "without side_info")
    if not (versions.get(old) or {}).get("count") and h.version not in versions:
        held = ", ".join(f"{info.get('name') or fp} ({fp}, {info['count']} items)"
                         for fp, info in versions.items()) or "none"
        raise TransformRefused(f"transform {h.fingerprint} maps old version {old} to "
                               f"{h.meta.get('target') or 'its target'}; the gallery {store.location} holds "
                               f"no item of {old} (its versions: {held})")
    if old in versions and versions[old]["dim"] != h.config.old_dim:
        raise TransformRefused(f"transform {h.fingerprint} takes {h.config.old_dim}-d vectors of {old}; the "
                               f"gallery's version {old} is {versions[old]['dim']}-d")


def transform_plan(store: Gallery, h: LoadedTransformation, batch_size: int
                   ) -> tuple[list[list[str]], list[np.ndarray]]:
    """(batches of ids, and per batch which are still at the old version): the items of the old
    version or of h's, in insertion order, cut every ``batch_size``; batches with nothing to do are
    left out."""
    ids: list[str] = []
    todo: list[bool] = []
    for part_ids, part_versions, _, _ in store.scan(norms=False):
        for i, v in zip(part_ids, part_versions, strict=True):
            if v in (h.old_fingerprint, h.version):
                ids.append(i)
                todo.append(v == h.old_fingerprint)
    flags = np.asarray(todo, bool)
    batches, masks = [], []
    for s in range(0, len(ids), batch_size):
        if flags[s:s + batch_size].any():
            batches.append(ids[s:s + batch_size])
            masks.append(flags[s:s + batch_size])
    return batches, masks


def transform(store: Gallery, h: LoadedTransformation, *, batch_size: int = 8192, progress: bool = True
              ) -> TransformResult:
    """Rewrite the store's items of h's old version through h as version ``h.version`` (declared
    with the first batch, named after h); resumable and crash-safe (module docstring). A second
    transform or backfill of the store while one runs is refused."""
    check_count(batch_size, "batch size", 1)
    with store.backfill_lock():
        check_transform(store, h)
        batches, masks = transform_plan(store, h, batch_size)
        todo = sum(int(m.sum()) for m in masks)
        already = store.count(h.version) if h.version in store.versions() else 0
        first = True
        with tqdm(total=todo, desc="transform", unit="item", disable=not progress) as bar:
            for part, mask in zip(batches, masks, strict=True):
                ids = [i for i, t in zip(part, mask.tolist(), strict=True) if t]
                old, _ = store.get(ids)
                x = np.zeros((len(part), h.config.old_dim), np.float32)
                x[mask] = np.asarray(old, np.float32)
                y, log_var = h.apply(x, batch_size=len(part))
                priors = (None if log_var is None
                          else np.exp(np.clip(log_var[mask].astype(np.float64), -700, 700)))
                if first:
                    store.add_version(h.version, h.config.new_dim, name=str(h.meta.get("name") or "h(old)"))
                store.replace(ids, y[mask], h.version, priors=priors)
                if first:
                    store.record_backfill_order(h.version, PLAIN_TRANSFORM_ORDER if log_var is None
                                                else TRANSFORM_ORDER)
                    first = False
                bar.update(len(ids))
    return TransformResult(todo, already, len(batches), h.version)
