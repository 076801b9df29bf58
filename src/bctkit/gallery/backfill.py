"""Backfill: re-embed a gallery's items with the new model, batch by batch, so that a run killed at
any point and started again ends with every item embedded once by the new model, bit for bit as an
uninterrupted run (none lost, none twice, none without its version). The batches come from
:mod:`bctkit.gallery.backfill_plan`.

One process (:func:`backfill`): each batch is one :meth:`~bctkit.gallery.interface.Gallery.replace`
(on SQLite one atomic commit; on Milvus an upsert of whole entities).

Several (:func:`distributed_backfill`, under ``torchrun``): rank 0 plans and sends every rank the
batches; rank r embeds batches r, r + N, r + 2N, ... on its own device. Where the store admits one
writer (the SQLite store, Milvus Lite) rank 0 gathers each round's embeddings and writes the
batches in plan order; on a Milvus server every rank upserts its own batches. A rank that fails
tells the others at the next exchange, so they stop with it instead of waiting.

A partial backfill (``limit`` short of the items left) leaves a store of two versions; without a
passed certificate new -> old in the store the new model cannot search it until the backfill ends.
Such a backfill is refused (:class:`PartialBackfillRefused`) before anything is embedded, unless
``unsearchable_while_partial`` says that is intended. The order is recorded in the store with the
first batch, so ``gallery status --report`` reads the report's curve of that order. One backfill at
a time per store: :meth:`~bctkit.gallery.interface.Gallery.backfill_lock`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bctkit.data.sources.base import DataSource
from bctkit.engine import distributed as D
from bctkit.errors import BctkitError
from bctkit.gallery.backfill_plan import (
    Order,
    PartialBackfillRefused,
    Plan,
    backfill_order,
    check_count,
    check_searchable,
    plan_backfill,
    rows_of,
)
from bctkit.gallery.checks import GalleryError
from bctkit.gallery.embed import Embedder, as_embedder, check_images, embed_batches, version_of
from bctkit.gallery.interface import Gallery, open_gallery, parse_store

__all__ = ["BackfillResult", "PartialBackfillRefused", "backfill", "backfill_order", "distributed_backfill"]


@dataclass
class BackfillResult:
    """What one backfill call did: items re-embedded now, already done before, and batches."""

    embedded: int
    already: int
    batches: int
    version: str


def _plan(store: Gallery, model: Any, order: Order, seed: int, batch_size: int, limit: int | None,
          unsearchable_while_partial: bool) -> Plan:
    """The checked plan of a backfill of ``store`` with ``model`` (refusals before anything is done)."""
    check_count(batch_size, "batch size", 1)
    if limit is not None:
        check_count(limit, "limit", 0)
    version, _, name, _ = version_of(model)
    full = plan_backfill(store, version, order, seed, batch_size)
    if limit is not None and limit < full.todo:
        if not unsearchable_while_partial:
            check_searchable(store, version, name, limit, full.todo)
        return plan_backfill(store, version, order, seed, batch_size, limit)
    return full


def _embed(model: Any, images: DataSource, rows: np.ndarray) -> np.ndarray:
    """The embeddings of ``images`` rows ``rows``, as one batch."""
    sub = images.subset(rows)
    return np.concatenate([f for _, f in embed_batches(model, sub, len(rows), progress=False,
                                                       desc="backfill")])


def _writer(store: Gallery, model: Any, order: str, plan: Plan) -> Callable[[list[str], np.ndarray], None]:
    """A batch writer that declares the version and records the order with its first batch (a
    backfill that fails before re-embedding anything writes nothing); each replaced item keeps the
    prior ``plan`` gives it (the uncertainty order's)."""
    version, dim, name, layout = version_of(model)
    first = [True]

    def write(ids: list[str], feats: np.ndarray) -> None:
        if first[0]:
            store.add_version(version, dim, name=name, layout=layout)
        store.replace(ids, feats, version, priors=plan.priors_of(ids))
        if first[0]:
            store.record_backfill_order(version, order)
            first[0] = False

    return write


def backfill(store: Gallery, model: Embedder, images: DataSource, *, order: Order = "random",
             seed: int = 0, batch_size: int = 256, progress: bool = True, limit: int | None = None,
             unsearchable_while_partial: bool = False) -> BackfillResult:
    """Re-embed the store's items with ``model`` (its version is its fingerprint, declared with the
    first batch), reading each item's image from ``images`` by key (an item's id is its image's key
    in the source, as ``bctkit gallery add`` stores them). ``limit``: stop after that many items (a
    partial backfill; run again to continue), refused without a passed certificate for the new
    model's queries on every other version's items unless ``unsearchable_while_partial``. A second
    backfill of the store while one runs is refused."""
    model = as_embedder(model)
    with store.backfill_lock():
        plan = _plan(store, model, order, seed, batch_size, limit, unsearchable_while_partial)
        rows = rows_of([i for b in plan.batches for i in b], images)
        write = _writer(store, model, order, plan)
        start = 0
        with tqdm(total=plan.todo, desc="backfill", unit="item", disable=not progress) as bar:
            for part, n in zip(plan.batches, plan.pending, strict=True):
                write(part, _embed(model, images, rows[start:start + len(part)]))
                start += len(part)
                bar.update(n)
    return BackfillResult(plan.todo, plan.already, len(plan.batches), version_of(model)[0])


def distributed_backfill(store_text: str, model: Embedder, images: DataSource, *, order: Order = "random",
                         seed: int = 0, batch_size: int = 256, progress: bool = True,
                         limit: int | None = None, unsearchable_while_partial: bool = False
                         ) -> BackfillResult:
    """:func:`backfill` of the store ``store_text`` over torchrun's processes (the process group
    joined; one process: the same as :func:`backfill`); see the module docstring. Every rank calls
    it; rank 0 returns the result, the others a copy."""
    model = as_embedder(model)
    check_images(model, images)
    every_rank_writes = parse_store(store_text).backend == "milvus"
    store = open_gallery(store_text) if D.is_main() or every_rank_writes else None
    try:
        if not D.is_distributed():
            assert store is not None
            return backfill(store, model, images, order=order, seed=seed, batch_size=batch_size,
                            progress=progress, limit=limit,
                            unsearchable_while_partial=unsearchable_while_partial)
        return _ranks(store, model, images, every_rank_writes, order, seed, batch_size, progress, limit,
                      unsearchable_while_partial)
    finally:
        if store is not None:
            store.close()


def _ranks(store: Gallery | None, model: Any, images: DataSource, every_rank_writes: bool, order: Order,
           seed: int, batch_size: int, progress: bool, limit: int | None, unsearchable: bool
           ) -> BackfillResult:
    """Every rank's part of :func:`distributed_backfill` (the process group joined)."""
    version = version_of(model)[0]
    with contextlib.ExitStack() as stack:
        decided: dict[str, Any] = {}
        if D.is_main():
            assert store is not None
            try:
                stack.enter_context(store.backfill_lock())
                plan = _plan(store, model, order, seed, batch_size, limit, unsearchable)
                if every_rank_writes and plan.batches:  # the others replace into it at once
                    _, dim, name, layout = version_of(model)
                    store.add_version(version, dim, name=name, layout=layout)
                    store.record_backfill_order(version, order)
                decided = {"batches": plan.batches, "pending": plan.pending, "already": plan.already,
                           "priors": plan.priors}
            except Exception as exc:  # the other ranks wait on this broadcast: tell them, then raise
                D.broadcast_object({"error": str(exc) if isinstance(exc, BctkitError) else
                                    f"backfill: rank 0 failed while planning ({type(exc).__name__})"})
                raise
        decided = D.broadcast_object(decided)
        if "error" in decided:
            raise GalleryError(decided["error"])
        plan = Plan(**decided)
        rows = _together(lambda: rows_of([i for b in plan.batches for i in b], images))
        if every_rank_writes:
            assert store is not None
            _together(lambda: _own_share(store, model, images, plan, rows, progress and D.is_main()))
        else:
            _gathered(store, model, images, plan, rows, order, progress)
    return BackfillResult(plan.todo, plan.already, len(plan.batches), version)


def _own_share(store: Gallery, model: Any, images: DataSource, plan: Plan, rows: np.ndarray,
               progress: bool) -> None:
    """This rank's batches, embedded and upserted by itself."""
    world, rank = D.world_size(), D.rank()
    batches = plan.batches
    starts = np.cumsum([0] + [len(b) for b in batches])
    version = version_of(model)[0]
    for j in tqdm(range(rank, len(batches), world), desc="backfill", unit="batch", disable=not progress):
        store.replace(batches[j], _embed(model, images, rows[starts[j]:starts[j + 1]]), version,
                      priors=plan.priors_of(batches[j]))


def _together(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank; when one fails, every rank stops with an error (none waits)."""
    try:
        out = fn()
    except BaseException:
        D.max_across(1)
        raise
    if D.max_across(0):
        raise GalleryError(f"backfill: another rank failed (see its error); rank {D.rank()} stopped")
    return out


def _gathered(store: Gallery | None, model: Any, images: DataSource, plan: Plan, rows: np.ndarray,
              order: str, progress: bool) -> None:
    """Rounds of one batch per rank; rank 0 gathers each round and writes its batches in plan order."""
    world, rank = D.world_size(), D.rank()
    batches, pending = plan.batches, plan.pending
    dim = version_of(model)[1]
    starts = np.cumsum([0] + [len(b) for b in batches])
    write = _writer(store, model, order, plan) if store is not None else None
    quiet = not (progress and D.is_main())
    with tqdm(total=sum(pending), desc="backfill", unit="item", disable=quiet) as bar:
        for t in range(0, len(batches), world):
            j = t + rank
            feats = _together(lambda j=j: _embed(model, images, rows[starts[j]:starts[j + 1]])
                              if j < len(batches) else np.zeros((0, dim), np.float32))
            full = D.gather_rows(torch.from_numpy(feats))

            def save(full: torch.Tensor | None = full, t: int = t) -> None:
                if write is None or full is None:
                    return
                at = 0
                for b in range(t, min(t + world, len(batches))):
                    write(batches[b], full[at:at + len(batches[b])].numpy())
                    at += len(batches[b])
                    bar.update(pending[b])

            _together(save)  # a failed write on rank 0 stops every rank here
