"""Ranks against explicit per-query item sets, in bounded memory: the engine of tests whose relevant
and junk items are listed per query (revisited Oxford / Paris) rather than given by identities.

Each query lists a few gallery items (its positives and junk, every setup's together); every other
gallery item is a negative. :func:`set_ranking` counts, for every listed item, the negatives ranked
ahead of it, with the counting of :mod:`bctkit.evaluation.blockwise` (query x gallery tiles, exact
float32 comparisons; equal scores put the lower gallery index first). Any rank a metric needs,
junk removed, is then that count plus a count among the few listed items ranked ahead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bctkit.errors import DataError
from bctkit.evaluation.blockwise import TILE, _blocks, _count_ahead, _unit
from bctkit.evaluation.search import ArrayLike, as_feature_matrix, check_pair

__all__ = ["set_ranking"]


def _index_sets(sets: Sequence[ArrayLike], n_query: int, n_gallery: int) -> list[torch.Tensor]:
    """``sets`` as int64 tensors of distinct gallery indices, one per query, or a DataError."""
    if len(sets) != n_query:
        raise DataError(f"sets has {len(sets)} entries for {n_query} queries; expected one per query")
    out = []
    for i, s in enumerate(sets):
        t = torch.as_tensor(np.asarray(s, dtype=np.int64)).flatten()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_gallery):
            raise DataError(f"sets[{i}] holds an index outside the gallery [0, {n_gallery})")
        if torch.unique(t).numel() != t.numel():
            raise DataError(f"sets[{i}] names a gallery index twice; expected distinct indices")
        out.append(t)
    return out


def set_ranking(query_feats: ArrayLike, gallery_feats: ArrayLike, sets: Sequence[ArrayLike], *,
                block: int = 1024, block_gallery: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query i: the gallery indices of ``sets[i]`` in rank order (best first) and, for each, the
    number of gallery items outside ``sets[i]`` ranked ahead of it (module docstring's rule).

    For tests whose relevant and junk items are listed per query (revisited Oxford / Paris): with the
    few listed items' order known, every rank a metric needs is a count inside the set plus these.
    Memory: one tile of the query block x ``block_gallery`` items (default 2^24 / max(rows, dim), so
    the normalised gallery block stays within 64 MiB as well); never the score matrix. A float16 /
    bfloat16 gallery is converted to float32 one block at a time.
    """
    if block < 1 or (block_gallery is not None and block_gallery < 1):
        raise DataError(f"block sizes must be >= 1, got block={block}, block_gallery={block_gallery}")
    q = as_feature_matrix(query_feats, "query_feats")
    g = as_feature_matrix(gallery_feats, "gallery_feats", keep_half=True)
    check_pair(q, g, "query_feats", "gallery_feats")
    if g.shape[0] >= 1 << 32:
        raise DataError(f"gallery of {g.shape[0]} items; at most 2^32 - 1 are supported")
    items = _index_sets(sets, q.shape[0], g.shape[0])
    empty = np.zeros(0, dtype=np.int64)
    out = [(empty, empty)] * q.shape[0]
    sizes = torch.as_tensor([t.numel() for t in items], dtype=torch.int64)
    for start, stop in _blocks(sizes, block):
        n = stop - start
        rows = torch.repeat_interleave(torch.arange(n), sizes[start:stop])
        if not rows.numel():
            continue
        cols = torch.cat(items[start:stop])
        member = torch.sort((rows << 32) | cols).values

        def negative(r: torch.Tensor, gc: torch.Tensor, member: torch.Tensor = member) -> torch.Tensor:
            key = (r.to(torch.int64) << 32) | gc
            return member[torch.searchsorted(member, key).clamp_(max=member.numel() - 1)] != key

        bg = block_gallery or max(1, TILE // max(n, g.shape[1]))
        rows, cols, ahead = _count_ahead(_unit(q[start:stop]), g, rows, cols, negative, bg, n * bg)
        ends = torch.cumsum(torch.bincount(rows, minlength=n), 0).tolist()
        for r in range(n):
            lo, hi = (ends[r - 1] if r else 0), ends[r]
            out[start + r] = (cols[lo:hi].flip(0).numpy().copy(), ahead[lo:hi].flip(0).numpy().copy())
    return out
