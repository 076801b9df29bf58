"""Running the scan's and the renderer's work items in order, in forked worker processes when the job
is large."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm.auto import tqdm

from bctkit.data.glyphs.render import OPEN_FONTS

SERIAL_BELOW = 4096
"""Jobs with fewer items than this run in-process (starting worker processes costs seconds)."""

T = TypeVar("T")
R = TypeVar("R")


def run_jobs(fn: Callable[[T], list[R]], tasks: list[T], sizes: list[int], workers: int, desc: str,
             progress: bool) -> list[R]:
    """``fn`` over ``tasks`` (each yielding a list), concatenated in order, with a tqdm bar counting
    items. Large jobs run in ``workers`` forked processes where fork exists (Linux); forking needs
    no ``__main__`` guard in the caller's script, and the workers touch neither torch nor the
    parent's open fonts (they reopen their own, so no file offset is shared)."""
    results: list[R] = []
    with tqdm(total=sum(sizes), desc=desc, unit="img", disable=not progress or not sum(sizes)) as bar:
        forkable = sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods()
        if not forkable or workers <= 1 or sum(sizes) < SERIAL_BELOW or len(tasks) < 2:
            for task, n in zip(tasks, sizes, strict=True):
                results.extend(fn(task))
                bar.update(n)
            return results
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=OPEN_FONTS.clear) as pool:
            for part, n in zip(pool.map(fn, tasks), sizes, strict=True):
                results.extend(part)
                bar.update(n)
    return results


def chunks(items: list[T], n: int) -> list[list[T]]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))
