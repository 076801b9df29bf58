"""Reading a dataset source in torch DataLoader worker processes: how many workers ``auto`` means,
running batches of work through them (a bctkit error raised in a worker comes back as the same
one-line error in the main process, not as a worker traceback), and the one such job the data layer
runs itself, finding the images that cannot be decoded (``data.skip_corrupt``). The layer above,
the engine's loader (``Feed``), reads its training and extraction batches through :func:`run_batches`
too; this module needs nothing from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bctkit.data.slots import SlotBatch
from bctkit.data.sources.base import CorruptImageError, DataSource
from bctkit.errors import BctkitError

__all__ = ["PREFETCH", "WorkerFailure", "auto_workers", "find_corrupt", "run_batches"]

PREFETCH = 4
"""Batches queued per worker ahead of the one being read."""


def auto_workers() -> int:
    """Loader workers for ``num_workers: auto`` on a file dataset: the CPUs this process may use,
    at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


class WorkerFailure:
    """A bctkit error raised in a worker, carried back as a value (one line, same type)."""

    def __init__(self, exc: BctkitError) -> None:
        self.kind = type(exc)
        self.message = str(exc)

    def raise_(self) -> None:
        raise self.kind(self.message)


def _collate(item: Any) -> Any:
    return item


def run_batches(dataset: torch.utils.data.Dataset, batches: Sequence[Any], workers: int, pin: bool
                ) -> Iterator[Any]:
    """``dataset.__getitems__(batch)`` of each of ``batches`` in order, in at most ``workers`` worker
    processes (0: in this one); a :class:`WorkerFailure` it returns is raised here, a
    :class:`~bctkit.data.slots.SlotBatch` becomes its tensors."""
    workers = min(workers, len(batches))
    loader = DataLoader(
        dataset, batch_sampler=batches, collate_fn=_collate, num_workers=workers, pin_memory=pin,
        generator=torch.Generator().manual_seed(0), prefetch_factor=PREFETCH if workers else None,
    )
    for out in loader:
        if isinstance(out, SlotBatch):
            out = out.take()
        elif isinstance(out, WorkerFailure):
            out.raise_()
        yield out


def find_corrupt(source: DataSource, workers: int, batch_size: int = 256, progress: bool = True
                 ) -> np.ndarray:
    """Indices of the images of ``source`` that cannot be decoded (decodes every image once, in
    ``workers`` worker processes)."""
    n = len(source)
    chunks = [np.arange(s, min(s + batch_size, n), dtype=np.int64) for s in range(0, n, batch_size)]
    bad: list[np.ndarray] = []
    with tqdm(total=n, desc="checking images", unit="img", disable=not progress) as bar:
        for found, count in run_batches(_CorruptFinder(source), chunks, workers, False):
            bad.append(found)
            bar.update(count)
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


class _CorruptFinder(torch.utils.data.Dataset):
    """What a worker runs to find undecodable images: indices -> (the undecodable ones, how many)."""

    def __init__(self, source: DataSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, indices: np.ndarray) -> Any:
        bad = []
        try:
            for i in indices:
                try:
                    self.source.read(int(i))
                except CorruptImageError:
                    bad.append(int(i))
        except BctkitError as exc:
            return WorkerFailure(exc)
        return np.asarray(bad, dtype=np.int64), len(indices)
