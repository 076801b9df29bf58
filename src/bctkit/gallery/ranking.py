"""The gallery's ranking rule, shared by every backend: decreasing cosine score, and among equal
scores the lower key (the earlier insertion) first; per-block top-k lists merge under it."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NO_KEY = np.iinfo(np.int64).max
"""Key of an empty result place (an approximate index found fewer than k items)."""


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """float32 C-ordered copy of ``x`` with unit L2 rows (an all-zero row stays zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))
    return np.ascontiguousarray(x / np.maximum(norms, np.float32(1e-12))[:, None], dtype=np.float32)


def merge(parts: Iterable[tuple[np.ndarray, np.ndarray, int]], n_queries: int, k: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-index rule-exact lists (scores, keys, version id) into one ranking of k places.

    Returns (scores [Q, k], keys [Q, k], version ids [Q, k]); k is clamped to the places given.
    """
    parts = [p for p in parts if p[0].shape[1]]
    if not parts:
        return (np.zeros((n_queries, 0), np.float32), np.zeros((n_queries, 0), np.int64),
                np.zeros((n_queries, 0), np.int64))
    scores = np.concatenate([p[0] for p in parts], axis=1)
    keys = np.concatenate([p[1] for p in parts], axis=1)
    vids = np.concatenate([np.full(p[0].shape, p[2], np.int64) for p in parts], axis=1)
    k = min(k, scores.shape[1])
    order = np.lexsort((keys, -scores.astype(np.float64)), axis=-1)[:, :k]
    return (np.take_along_axis(scores, order, 1).astype(np.float32, copy=False),
            np.take_along_axis(keys, order, 1), np.take_along_axis(vids, order, 1))
