"""Backfill: re-embed a gallery's items with the new model, batch by batch, each batch one atomic
commit of the store, so that a run killed at any point and started again ends with every item
embedded exactly once by the new model (none lost, none twice, none without its version).

Orders (``order``):

- ``random``: a permutation of every item of the store (all of them, done or not, in insertion
  order) drawn from ``seed``; items already at the new version are skipped. Because the permutation
  is over the whole, unchanging set of ids, a restarted run continues the same order.
- ``benefit``: most-benefit-first in the spirit of FastFill (Jaeckle et al., ICLR 2023), which
  re-embeds first the items whose old embeddings are least reliable. FastFill learns that
  uncertainty with a small model; bctkit uses a training-free proxy instead: the L2 norm of the
  item's current (old) embedding, smallest first (in margin-trained face models the feature norm
  grows with image quality, so low-norm items gain most from a better model), ties in insertion
  order. Items not yet re-embedded keep their old embeddings, so a restarted run ranks them as
  the first run did.

A partial backfill (``limit`` short of the items left) leaves a store of two versions; without a
passed certificate new -> old in the store the new model cannot search it (its queries would
compare with old items on no vouched coordinates) until the backfill ends. Such a backfill is
refused (:class:`PartialBackfillRefused`) before anything is embedded, unless
``unsearchable_while_partial`` says that is intended. A full backfill is always allowed. The order
is recorded in the store (:meth:`GalleryStore.record_backfill_order`), with the first batch, so
``gallery status --report`` reads the report's curve of that order.

One backfill at a time per store: a backfill holds an exclusive ``flock`` on the store's folder
while it runs, and a second one is refused at once (two running together would each re-embed the
items the other is re-embedding). The kernel drops the lock when its process dies, so a SIGKILLed
backfill leaves nothing stuck. The new version is declared with the first batch, so a backfill
that fails before re-embedding anything writes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from bctkit.data.sources.base import DataSource
from bctkit.errors import ConfigError, DataError
from bctkit.gallery.backends.sqlite.store import GalleryStore
from bctkit.gallery.checks import GalleryError
from bctkit.gallery.embed import Embedder, as_embedder, embed_batches, version_of
from bctkit.gallery.search import search_blocker

Order = Literal["random", "benefit"]


class PartialBackfillRefused(GalleryError):
    """A partial backfill would leave a store its new model cannot search (no passed certificate)."""


@dataclass
class BackfillResult:
    """What one backfill call did: items re-embedded now, already done before, and batches."""

    embedded: int
    already: int
    batches: int
    version: str


def backfill_order(store: GalleryStore, new_version: str, order: Order, seed: int = 0) -> list[str]:
    """The ids still to re-embed with ``new_version``, in the order the backfill takes them."""
    ids = store.ids()
    if order == "random":
        ranked = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    elif order == "benefit":
        vectors, _ = store.get(ids)
        norms = np.array([np.linalg.norm(np.asarray(v, dtype=np.float64)) for v in vectors])
        ranked = [ids[i] for i in np.argsort(norms, kind="stable")]
    else:
        raise ConfigError(f"backfill order {order!r}: expected 'random' or 'benefit'")
    _, versions = store.get(ranked) if ranked else ([], [])
    return [i for i, v in zip(ranked, versions, strict=True) if v != new_version]


def backfill(store: GalleryStore, model: Embedder, images: DataSource, *, order: Order = "random",
             seed: int = 0, batch_size: int = 256, progress: bool = True, limit: int | None = None,
             unsearchable_while_partial: bool = False) -> BackfillResult:
    """Re-embed the store's items with ``model`` (its version is its fingerprint, declared with the
    first batch), reading each item's image from ``images`` by key (an item's id is its image's key
    in the source, as ``bctkit gallery add`` stores them). ``limit``: stop after that many items (a
    partial backfill; run again to continue), refused without a passed certificate for the new
    model's queries on every other version's items unless ``unsearchable_while_partial``. A second
    backfill of the store while one runs is refused."""
    _check_count(batch_size, "batch size", 1)
    if limit is not None:
        _check_count(limit, "limit", 0)
    model = as_embedder(model)
    version, dim, name, layout = version_of(model)
    with _exclusive(store):
        todo = backfill_order(store, version, order, seed)
        already = store.count() - len(todo)
        if limit is not None and limit < len(todo):
            if not unsearchable_while_partial:
                _check_searchable(store, version, name, limit, len(todo))
            todo = todo[:limit]
        rows = _rows_of(todo, images)
        done = batches = 0
        with tqdm(total=len(todo), desc="backfill", unit="item", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                part = todo[start:start + batch_size]
                sub = images.subset(rows[start:start + len(part)])
                for _, feats in embed_batches(model, sub, len(part), progress=False, desc="backfill"):
                    if not batches:  # declared with the first batch: a failure before writes nothing
                        store.add_version(version, dim, name=name, layout=layout)
                    store.replace(part, feats, version)  # one atomic commit per batch
                    if not batches:
                        store.record_backfill_order(version, order)
                done += len(part)
                batches += 1
                bar.update(len(part))
    return BackfillResult(done, already, batches, version)


def _check_count(value: object, what: str, least: int) -> None:
    """Refuse ``value`` unless it is an integer >= ``least``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
        raise ConfigError(f"backfill: {what} must be an integer >= {least}, got {value!r}")


def _check_searchable(store: GalleryStore, version: str, name: str | None, limit: int, left: int) -> None:
    """Refuse a partial backfill after which ``version``'s queries could not search the store."""
    blocked = search_blocker(store, version)
    if blocked is not None:
        label = f"{name} ({version})" if name else version
        raise PartialBackfillRefused(
            f"backfill: limit {limit} re-embeds {limit} of the {left} items left, and the store holds no "
            f"passed certificate for {label} queries on the {blocked.count} items of {blocked.label}: the "
            "partly backfilled store could not be searched by the new model; certify first (bctkit "
            "gallery certify STORE CERT.json with a passed certificate), use a separate store, run a "
            "full backfill (no --limit), or pass --unsearchable-while-partial")


@contextlib.contextmanager
def _exclusive(store: GalleryStore) -> Iterator[None]:
    """Hold the store's backfill lock (an exclusive flock on its folder); refused when taken."""
    fd = os.open(store.path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GalleryError(f"{store.path}: another backfill is running on this store; wait for it to "
                               "end (or stop it: a killed backfill releases the store)") from None
        yield
    finally:
        os.close(fd)


def _rows_of(ids: Sequence[str], images: DataSource) -> np.ndarray:
    """Row of each id in ``images`` (ids are the source's keys); a missing image is named."""
    index = {images.key(i): i for i in range(len(images))}
    missing = [i for i in ids if i not in index]
    if missing:
        raise DataError(f"{images.name}: no image for {len(missing)} gallery item(s), e.g. {missing[:3]}; "
                        "give the image source the items were added from")
    return np.array([index[i] for i in ids], dtype=np.int64)
