"""A backfill's plan: which items it re-embeds, in which order, cut into which batches.

Orders (``order``):

- ``random``: a permutation of every item of the store (all of them, done or not, in insertion
  order) drawn from ``seed``. Because the permutation is over the whole, unchanging set of ids, a
  restarted run continues the same order.
- ``benefit``: most-benefit-first in the spirit of FastFill (Jaeckle et al., ICLR 2023), which
  re-embeds first the items whose old embeddings are least reliable. FastFill learns that
  uncertainty with a small model; bctkit uses a training-free proxy instead: the L2 norm of the
  item's old embedding, smallest first (in margin-trained face models the feature norm grows with
  image quality, so low-norm items gain most from a better model), ties in insertion order.
- ``uncertainty``: FastFill's own order after ``bctkit gallery transform`` with a transformation
  that predicts its uncertainty: the items whose transformed vectors h was least sure of (largest
  predicted sigma^2, kept as each item's prior) first; items never transformed before all of them;
  ties in insertion order. Each replaced item keeps its sigma^2 as its prior, so a restarted
  backfill ranks the items it already did as before.

Batches are what make a restarted backfill end bit for bit as an uninterrupted one: an image's
embedding may depend on the batch it goes through (kernels pick their algorithm by batch size), so
every item must be embedded in the batch an uninterrupted run gives it.

- A backend that writes each batch in one atomic commit, in plan order (the SQLite store, written
  by one process), always holds a prefix of the plan: the items still to do, in order, cut into
  batches, are the uninterrupted run's remaining batches.
- A backend without such commits (Milvus: upserts of whole entities, possibly several ranks each
  writing its own batches) may hold any set of finished items and half a batch. There the plan is
  over every item the backfill ever had to do: those still at another version (ranked by their
  current norm) and those it already replaced (ranked by their prior: the norm of the vector they
  had, which the backend records at each replace). The plan, and so every batch, is the same on
  every restart, and a batch holding an item still to do is embedded and written whole again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from bctkit.data.sources.base import DataSource
from bctkit.errors import ConfigError, DataError
from bctkit.gallery.checks import GalleryError
from bctkit.gallery.interface import Gallery
from bctkit.gallery.search import search_blocker

Order = Literal["random", "benefit", "uncertainty"]
ORDERS = ("random", "benefit", "uncertainty")
TRANSFORM_ORDER = "transform"
"""What :meth:`~bctkit.gallery.interface.Gallery.record_backfill_order` notes for a version written
by ``bctkit gallery transform`` with a transformation that predicts its uncertainty (each item's
sigma^2 kept as its prior, which the ``uncertainty`` order reads)."""
PLAIN_TRANSFORM_ORDER = "transform-no-uncertainty"
"""The same for a transformation without uncertainty: no sigma^2 is kept, so the ``uncertainty``
order is refused on its items."""
TRANSFORM_ORDERS = (TRANSFORM_ORDER, PLAIN_TRANSFORM_ORDER)
"""Either: ``gallery status`` tells transformed items from re-embedded ones by them."""
UNTRANSFORMED = float(np.finfo(np.float64).max)
"""The uncertainty order's value (and recorded prior) of an item no transformation reached."""


class PartialBackfillRefused(GalleryError):
    """A partial backfill would leave a store its new model cannot search (no passed certificate)."""


@dataclass
class Plan:
    """The batches a backfill runs (only those holding an item still to do; with a limit, the last
    one cut to it), how many items of each are still to do, the items already done before, and
    (``uncertainty`` order) the prior each replaced item keeps, by id."""

    batches: list[list[str]]
    pending: list[int]
    already: int
    priors: dict[str, float] | None = None

    def priors_of(self, ids: list[str]) -> np.ndarray | None:
        """The priors ``ids`` keep when replaced (None: the backend's own)."""
        return None if self.priors is None else np.array([self.priors[i] for i in ids])

    @property
    def todo(self) -> int:
        return sum(self.pending)


def ranked(store: Gallery, version: str, order: Order, seed: int = 0
           ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids of the plan in order, whether each is still to do, the value each was ranked by) for a
    backfill to ``version`` (see the module docstring: with priors recorded, the items already
    replaced stay in the plan)."""
    if order not in ORDERS:
        raise ConfigError(f"backfill order {order!r}: expected 'random', 'benefit' or 'uncertainty'")
    if order == "uncertainty":
        check_transformed(store, version)
    ids: list[str] = []
    versions: list[str] = []
    norms, priors = [], []
    for part_ids, part_versions, part_norms, part_priors in store.scan(norms=order == "benefit"):
        ids += part_ids
        versions += part_versions
        norms.append(part_norms)
        priors.append(part_priors)
    if not ids:
        return [], np.zeros(0, bool), np.zeros(0)
    norm, prior = np.concatenate(norms), np.concatenate(priors)
    todo = np.array([v != version for v in versions], dtype=bool)
    member = todo | (prior >= 0) if store.records_prior else todo
    value = np.zeros(len(ids))
    if order == "random":
        rank = np.random.default_rng(seed).permutation(len(ids))
    elif order == "benefit":
        value = np.where(todo, norm, prior)
        rank = np.argsort(value, kind="stable")
    else:  # most uncertain first; never transformed before all
        value = np.where(prior >= 0, prior, UNTRANSFORMED)
        rank = np.argsort(-value, kind="stable")
    rank = rank[member[rank]]
    return [ids[i] for i in rank], todo[rank], value[rank]


def check_transformed(store: Gallery, version: str) -> None:
    """Refuse the uncertainty order on a store no transformation with uncertainty has written, and,
    where a restart plans over the items already done by their priors (Milvus), after a backfill to
    ``version`` in another order: its items hold vector norms as priors, not sigma^2."""
    used = store.backfill_orders()
    other = [o for o in used.get(version, []) if o != "uncertainty"]
    if store.records_prior and other:
        raise ConfigError(f"backfill order 'uncertainty': {store.location} was backfilled to {version} in "
                          f"order {', '.join(other)}; its replaced items hold no uncertainty to plan a "
                          f"restart by; continue with --order {other[0]}")
    if not any(TRANSFORM_ORDER in orders for orders in used.values()):
        plain = any(PLAIN_TRANSFORM_ORDER in orders for orders in used.values())
        held = "only items transformed without uncertainty" if plain else "no transformed items"
        raise ConfigError(f"backfill order 'uncertainty': {store.location} holds {held}, so no recorded "
                          "uncertainty (bctkit gallery transform with a transformation that predicts its "
                          "uncertainty records it); use --order random or benefit")


def backfill_order(store: Gallery, version: str, order: Order, seed: int = 0) -> list[str]:
    """The ids still to re-embed with ``version``, in the order the backfill takes them."""
    ids, todo, _ = ranked(store, version, order, seed)
    return [i for i, t in zip(ids, todo.tolist(), strict=True) if t]


def plan_backfill(store: Gallery, version: str, order: Order, seed: int, batch_size: int,
                  limit: int | None = None) -> Plan:
    """The batches a backfill to ``version`` runs now; ``limit``: at most that many items still to do
    (the last batch is cut to reach it exactly)."""
    ids, todo, value = ranked(store, version, order, seed)
    priors = dict(zip(ids, value.tolist(), strict=True)) if order == "uncertainty" else None
    if not store.records_prior:  # plan-order atomic commits: the done items are a prefix
        ids = [i for i, t in zip(ids, todo.tolist(), strict=True) if t]
        todo = np.ones(len(ids), bool)
    batches, pending = [], []
    left = len(ids) if limit is None else limit
    for s in range(0, len(ids), batch_size):
        if left <= 0:
            break
        part, need = ids[s:s + batch_size], todo[s:s + batch_size]
        n = int(need.sum())
        if not n:
            continue
        if n > left:  # cut after the left-th item still to do
            part = part[: int(np.flatnonzero(need)[left - 1]) + 1]
            n = left
        batches.append(part)
        pending.append(n)
        left -= n
    return Plan(batches, pending, store.count() - int(todo.sum()), priors)


def check_searchable(store: Gallery, version: str, name: str | None, limit: int, left: int) -> None:
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


def check_count(value: object, what: str, least: int) -> None:
    """Refuse ``value`` unless it is an integer >= ``least``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
        raise ConfigError(f"backfill: {what} must be an integer >= {least}, got {value!r}")


def rows_of(ids: list[str], images: DataSource) -> np.ndarray:
    """Row of each id in ``images`` (ids are the source's keys); a missing image is named."""
    index = {images.key(i): i for i in range(len(images))}
    missing = [i for i in ids if i not in index]
    if missing:
        raise DataError(f"{images.name}: no image for {len(missing)} gallery item(s), e.g. {missing[:3]}; "
                        "give the image source the items were added from")
    return np.array([index[i] for i in ids], dtype=np.int64)
