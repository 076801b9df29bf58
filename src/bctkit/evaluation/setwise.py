"""Ranks against explicit per-query item sets, in bounded memory: the engine of tests whose relevant
and junk items are listed per query (revisited Oxford / Paris) rather than given by identities.

Each query lists a few gallery items (its positives and junk, every setup's together); every other
gallery item is a negative. :func:`set_ranking` gives, for every listed item, the number of negatives
ranked ahead of it; any rank a metric needs, junk removed, is then that count plus a count among the
few listed items ranked ahead.

How: every (query, gallery item) pair has an exact int64 key that orders the ranking, the float32
score's bit pattern (decreasing score) then the inverted gallery index (equal scores: the lower index
first), as in :mod:`bctkit.evaluation.blockwise`. The listed items' keys, sorted per query, cut the
key line into intervals; the gallery is walked in blocks, each block's scores against the query
block are located among the listed scores by one batched binary search (the exact keys are needed
only where a score equals a listed one), and the interval counts are added up. A listed item's
negatives ahead are the items in the intervals above it less the listed items above it. No score
matrix is held: one query block x gallery block tile, and the gallery block normalised (a float16 /
bfloat16 gallery converted to float32) one at a time. The listed items' scores come from a product
with their own rows and are checked against the tiles' scores of the same pairs; were they to differ
in a bit (a BLAS path that rounds otherwise), the walk is done again with the tiles' values, so the
ranks are those of the scores the tiles compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bctkit.errors import DataError
from bctkit.evaluation.search import ArrayLike, as_feature_matrix, check_pair

__all__ = ["set_ranking"]

GALLERY_BLOCK = 1 << 24  # elements of one normalised gallery block (64 MiB of float32)
SCORE_TILE = 1 << 22  # elements of one query x gallery tile (about 28 bytes each in flight)
_LOW32 = (1 << 32) - 1
_LAST = torch.iinfo(torch.int64).max


def _keys(scores: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """int64 keys, greater = ranked ahead: the float32 score's order (exact, -0.0 equal to +0.0),
    then the lower gallery index ``cols``."""
    bits = (scores + 0.0).view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (ordered << 32) | (_LOW32 - cols)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows as float32 scaled to unit length: ``torch.nn.functional.normalize``'s arithmetic, in place
    on the float32 copy when the rows had to be converted."""
    if x.dtype == torch.float32:
        return torch.nn.functional.normalize(x, dim=1)
    x = x.to(torch.float32)
    return x.div_(x.norm(2, 1, keepdim=True).clamp_min_(1e-12))


def _gallery(x: ArrayLike) -> torch.Tensor:
    """A 2-D CPU tensor, float16 / bfloat16 / float32 kept as they are (no copy of a huge gallery);
    finiteness is checked on the scores, block by block."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu()
    if t.ndim != 2:
        raise DataError(f"gallery_feats must be a 2-D (n, d) feature matrix, got shape {tuple(t.shape)}")
    return t if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t.to(torch.float32)


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


def _listed_scores(qb: torch.Tensor, g: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, step: int
                   ) -> torch.Tensor:
    """Scores of the (row, col) pairs from products with the listed rows, ``step`` columns at a time."""
    uniq, inv = torch.unique(cols, return_inverse=True)
    scores = torch.empty(rows.numel(), dtype=torch.float32)
    for c0 in range(0, uniq.numel(), step):
        sub = qb @ _unit(g[uniq[c0 : c0 + step]]).T
        sel = torch.nonzero((inv >= c0) & (inv < c0 + step)).flatten()
        scores[sel] = sub[rows[sel], inv[sel] - c0]
    return scores


def _walk(qb: torch.Tensor, g: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, table: torch.Tensor,
          key_table: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per row, the gallery items in each interval of its ascending listed keys ``key_table`` [B, S],
    whose scores are ``table``; the listed pairs' scores as the tiles computed them).

    An item is located among the listed scores by a float binary search; only where it equals a
    listed score (the listed items themselves, and true ties) is its exact key located instead."""
    n_rows, width = table.shape[0], table.shape[1] + 1
    hist = torch.zeros(n_rows * width, dtype=torch.int64)
    offsets = (torch.arange(n_rows, dtype=torch.int32) * width)[:, None]
    seen = torch.empty(rows.numel(), dtype=torch.float32)
    for gs in range(0, g.shape[0], step):
        sc = qb @ _unit(g[gs : gs + step]).T
        if not np.isfinite(float(sc.sum())):  # scores lie in [-1, 1]: only NaN / Inf features reach here
            bad = gs + int(torch.nonzero(~torch.isfinite(sc).all(0))[0])
            raise DataError(f"gallery_feats row {bad} contains NaN or Inf; expected finite features")
        pos = torch.searchsorted(table, sc, out_int32=True)
        equal = table.gather(1, pos.clamp(max=table.shape[1] - 1).long()) == sc
        if bool(equal.any()):
            tied = torch.nonzero(equal, as_tuple=True)
            keys = _keys(sc[tied], tied[1] + gs)
            pos[tied] = torch.searchsorted(key_table[tied[0]], keys[:, None], out_int32=True).flatten()
        hist += torch.bincount((pos + offsets).flatten(), minlength=hist.numel())
        here = torch.nonzero((cols >= gs) & (cols < gs + sc.shape[1])).flatten()
        seen[here] = sc[rows[here], cols[here] - gs]
    return hist.view(n_rows, width), seen


def set_ranking(query_feats: ArrayLike, gallery_feats: ArrayLike, sets: Sequence[ArrayLike], *,
                block: int = 1024, block_gallery: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query i: the gallery indices of ``sets[i]`` in rank order (best first: decreasing cosine
    score, equal scores by increasing index) and, for each, the number of gallery items outside
    ``sets[i]`` ranked ahead of it. ``block`` queries at a time; ``block_gallery`` gallery items per
    tile (default: 2^24 / dim and 2^22 / queries in the block, whichever is smaller).
    """
    if block < 1 or (block_gallery is not None and block_gallery < 1):
        raise DataError(f"block sizes must be >= 1, got block={block}, block_gallery={block_gallery}")
    q = as_feature_matrix(query_feats, "query_feats")
    g = _gallery(gallery_feats)
    check_pair(q, g, "query_feats", "gallery_feats")
    if g.shape[0] >= 1 << 32:
        raise DataError(f"gallery of {g.shape[0]} items; at most 2^32 - 1 are supported")
    items = _index_sets(sets, q.shape[0], g.shape[0])
    empty = np.zeros(0, dtype=np.int64)
    out = [(empty, empty)] * q.shape[0]
    for start in range(0, q.shape[0], block):
        stop = min(start + block, q.shape[0])
        sizes = torch.as_tensor([t.numel() for t in items[start:stop]], dtype=torch.int64)
        if not int(sizes.sum()):
            continue
        n = stop - start
        step = block_gallery or max(1, min(GALLERY_BLOCK // g.shape[1], SCORE_TILE // n))
        qb = _unit(q[start:stop])
        rows = torch.repeat_interleave(torch.arange(n), sizes)
        cols = torch.cat(items[start:stop])
        starts = (torch.cumsum(sizes, 0) - sizes).tolist()
        scores = _listed_scores(qb, g, rows, cols, step)
        for attempt in range(2):
            # each row's listed keys ascending (rows in order), padded with keys above every other
            keys = _keys(scores, cols)
            order = torch.sort(keys, stable=True).indices
            order = order[torch.sort(rows[order], stable=True).indices]
            at = (rows[order], torch.arange(rows.numel()) - torch.as_tensor(starts)[rows[order]])
            key_table = torch.full((n, int(sizes.max())), _LAST, dtype=torch.int64)
            key_table[at] = keys[order]
            table = torch.full(key_table.shape, torch.inf)
            table[at] = scores[order]
            hist, seen = _walk(qb, g, rows, cols, table, key_table, step)
            if torch.equal(_keys(seen, cols), keys):
                break
            if attempt:
                raise RuntimeError("set_ranking: the same score computed twice differed; BLAS is not "
                                   "deterministic here")
            scores = seen
        above = torch.flip(torch.cumsum(torch.flip(hist, [1]), 1), [1])  # above[r, t] = sum of hist[r, t:]
        for r, (first, s) in enumerate(zip(starts, sizes.tolist(), strict=True)):
            if s:  # listed item t (ascending): the items above it, less the s - 1 - t listed ones
                ahead = above[r, 1 : s + 1] - (s - 1 - torch.arange(s))
                ranked = order[first : first + s]
                out[start + r] = (cols[ranked].flip(0).numpy().copy(), ahead.flip(0).numpy().copy())
    return out
