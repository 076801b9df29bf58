"""id -> key lookup of an open gallery store, by 64-bit hashes of the ids in sorted runs.

Why not a dict: inserting a million fresh strings into a Python dict costs about 0.3 s, as much as
writing their vectors to disk, and an add must both check and insert its ids. Here an add hashes
its ids (Python's ``hash``, cached in the string objects), sorts the hashes into a new run, and
runs are merged when the newer one reaches half the older one's size (a linear merge of two sorted
arrays), so there are O(log n) runs. A lookup finds the keys whose hash equals the id's in every
run (``searchsorted``) and returns them as candidates; the caller confirms each against the stored
id string and the key's liveness (a hash may collide, a deleted key stays in its run).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Hashed(NamedTuple):
    """int64 hashes of a list of ids (this process's ``hash``; never stored), the order that sorts
    them and the ids' lengths in characters, computed once per call and shared by its checks,
    lookups and writes."""

    values: np.ndarray
    order: np.ndarray
    lengths: np.ndarray


def hash_ids(ids: Sequence[str], lengths: np.ndarray | None = None) -> Hashed:
    """The :class:`Hashed` of ``ids`` (``lengths``: their lengths, when known)."""
    h = np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids))
    if lengths is None:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return Hashed(h, np.argsort(h), lengths)


class IdMap:
    """Sorted runs of (hash, key): every key ever added, dead ones included."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, hashed: Hashed, keys: np.ndarray) -> None:
        """Record ``keys`` under the hashes of their ids."""
        if not len(keys):
            return
        order = hashed.order
        self.runs.append((hashed.values[order], np.asarray(keys, dtype=np.int64)[order]))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            (ha, ka), (hb, kb) = self.runs.pop(-2), self.runs.pop()
            h = np.concatenate([ha, hb])
            k = np.concatenate([ka, kb])
            order = np.argsort(h, kind="stable")  # two sorted runs: timsort merges them in linear time
            self.runs.append((h[order], k[order]))

    def candidates(self, hashed: Hashed) -> tuple[np.ndarray, np.ndarray]:
        """(query positions, keys): every recorded key whose hash equals a query's."""
        if not self.runs or not len(hashed.values):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        order = hashed.order
        hs = hashed.values[order]
        pos_parts, key_parts = [], []
        for rh, rk in self.runs:
            lo = np.searchsorted(rh, hs, "left")
            hit = np.flatnonzero(rh[np.minimum(lo, len(rh) - 1)] == hs)
            if not hit.size:
                continue
            n = np.searchsorted(rh, hs[hit], "right") - lo[hit]  # usually 1; more: equal hashes
            starts = np.repeat(lo[hit], n)
            within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
            pos_parts.append(np.repeat(order[hit], n))
            key_parts.append(rk[starts + within])
        if not pos_parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(pos_parts), np.concatenate(key_parts)
