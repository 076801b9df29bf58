"""Full-ranking retrieval metrics (mAP, CMC, mAP@R) in memory bounded by a block size.

The one implementation of full ranking in bctkit (the protocols and
:mod:`bctkit.evaluation.retrieval` use it). Sorting every query's whole row of scores is slow at 10k
queries x 1M gallery items even in blocks. The metrics only need, for every relevant
item of a query, its rank among the non-junk items, and that rank is a count: 1 + the number of
non-junk items ranked ahead of it. This module computes those counts walking query blocks and,
inside each, gallery blocks, so the largest temporary is one ``block x block_gallery`` score tile
(plus the query block's relevant items). Nothing is approximated: the ranks are those of the
ranking rule used everywhere in bctkit (decreasing cosine score, equal scores with the lower gallery
index first, i.e. a stable sort), with scores compared as exact float32 bit patterns.

How a block is counted: the relevant items of each query (same identity, not junk) are scored and
sorted; a gallery item that is neither relevant nor junk is ahead of a relevant item when its score
is higher, or equal with a lower gallery index. Items scoring below a query's lowest relevant item
are ahead of nothing, so only the few items above it are located among the relevant scores (a
binary search over exact integer keys); a difference array turns those positions into counts.

Junk, removed from every ranking before anything is counted: the query's own item (``exclude_self``),
items with the query's identity and camera (when cameras are given), and ``gallery_junk`` items.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from bctkit.errors import DataError
from bctkit.evaluation.search import (
    ArrayLike,
    FaissIndex,
    as_feature_matrix,
    check_k_within_gallery,
    check_pair,
    encode_ids,
    normalized,
    topk_search,
)

__all__ = ["cmc_from_ranks", "full_ranking", "indexed_cmc", "summarize"]

TILE = 1 << 24  # score tile elements (64 MiB of float32) when block_gallery is not given
MAX_PAIRS = 1 << 22  # (query, same-identity item) pairs per query block
_LOW32 = (1 << 32) - 1


def _score_keys(scores: torch.Tensor) -> torch.Tensor:
    """float32 scores -> int64 in [0, 2^32) with the same order (exact, -0.0 equal to +0.0)."""
    bits = (scores + 0.0).view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return ordered.to(torch.int64) + (1 << 31)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length, row by row (a row's result does not depend on the other rows),
    so the gallery is normalised one block at a time instead of copied whole."""
    return torch.nn.functional.normalize(x, dim=1)


def _check(q: torch.Tensor, g: torch.Tensor, qid: torch.Tensor, gid: torch.Tensor, exclude_self: bool,
           gallery_junk: torch.Tensor | None) -> None:
    check_pair(q, g, "query_feats", "gallery_feats")
    for ids, feats, name in ((qid, q, "query_ids"), (gid, g, "gallery_ids")):
        if ids.shape[0] != feats.shape[0]:
            raise DataError(f"{name} has {ids.shape[0]} labels for {feats.shape[0]} feature rows")
    if exclude_self and q.shape[0] != g.shape[0]:
        raise DataError("exclude_self needs query and gallery sets of equal length")
    if gallery_junk is not None and gallery_junk.shape != (g.shape[0],):
        raise DataError(f"gallery_junk must have one flag per gallery row ({g.shape[0]}), "
                        f"got shape {tuple(gallery_junk.shape)}")
    if g.shape[0] >= 1 << 32:
        raise DataError(f"gallery of {g.shape[0]} items; at most 2^32 - 1 are supported")


def _relevant_pairs(qid_b: torch.Tensor, qcam_b: torch.Tensor | None, rows_global: torch.Tensor,
                    g_order: torch.Tensor, g_sorted: torch.Tensor, gcam: torch.Tensor | None,
                    junk: torch.Tensor, exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row in block, gallery index) of every relevant pair of the block: same identity, not junk."""
    start = torch.searchsorted(g_sorted, qid_b, side="left")
    count = torch.searchsorted(g_sorted, qid_b, side="right") - start
    rows = torch.repeat_interleave(torch.arange(len(qid_b)), count)
    offset = torch.arange(rows.numel()) - (torch.cumsum(count, 0) - count)[rows]
    cols = g_order[start[rows] + offset]
    keep = ~junk[cols]
    if gcam is not None and qcam_b is not None:
        keep &= gcam[cols] != qcam_b[rows]
    if exclude_self:
        keep &= cols != rows_global[rows]
    return rows[keep], cols[keep]


def _pair_scores(qb: torch.Tensor, g: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 tile: int) -> torch.Tensor:
    """Scores of (row, col) pairs by matrix products over the distinct columns, in chunks."""
    uniq, inv = torch.unique(cols, return_inverse=True)
    out = torch.empty(rows.numel(), dtype=torch.float32)
    step = max(1, tile // max(1, qb.shape[0]))
    for c0 in range(0, uniq.numel(), step):
        sub = qb @ _unit(g[uniq[c0 : c0 + step]]).T
        sel = torch.nonzero((inv >= c0) & (inv < c0 + step)).flatten()
        out[sel] = sub[rows[sel], inv[sel] - c0]
    return out


def _block_ranks(qb: torch.Tensor, g: torch.Tensor, qid_b: torch.Tensor, gid: torch.Tensor,
                 junk: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block_gallery: int,
                 tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the block's relevant pairs: (row, 1-based position among the row's relevant items in
    rank order, 1-based rank among non-junk items), pairs sorted by row."""
    scores = _pair_scores(qb, g, rows, cols, tile)
    # ascending order = ranked later: lower score first, equal scores by decreasing gallery index
    primary = (rows.to(torch.int64) << 32) | _score_keys(scores)
    by_col = torch.sort(cols, descending=True, stable=True).indices
    order = by_col[torch.sort(primary[by_col], stable=True).indices]
    primary, cols, rows, scores = primary[order], cols[order], rows[order], scores[order]
    n = primary.numel()
    group = torch.searchsorted(primary, primary, side="left")
    secondary = (group << 32) | (_LOW32 - cols)
    per_row = torch.bincount(rows, minlength=qb.shape[0])
    row_start = torch.cumsum(per_row, 0) - per_row
    row_min = torch.full((qb.shape[0],), math.inf)
    row_min.scatter_reduce_(0, rows, scores, reduce="amin")
    diff = torch.zeros(n + 1, dtype=torch.int64)
    buf = torch.empty(qb.shape[0] * min(block_gallery, g.shape[0]))  # one tile, reused
    above = torch.empty(buf.shape, dtype=torch.bool)
    for gs in range(0, g.shape[0], block_gallery):
        gb = _unit(g[gs : gs + block_gallery])
        sc = torch.mm(qb, gb.T, out=buf[: qb.shape[0] * gb.shape[0]].view(qb.shape[0], gb.shape[0]))
        mask = torch.ge(sc, row_min[:, None], out=above[: sc.numel()].view(sc.shape))
        r, c = torch.nonzero(mask, as_tuple=True)
        gc = c + gs
        neg = (gid[gc] != qid_b[r]) & ~junk[gc]
        r, c, gc = r[neg], c[neg], gc[neg]
        if not r.numel():
            continue
        key = (r.to(torch.int64) << 32) | _score_keys(sc[r, c])
        pos = torch.searchsorted(primary, key, side="left")
        tied = torch.nonzero(torch.searchsorted(primary, key, side="right") > pos).flatten()
        if tied.numel():
            pos[tied] = torch.searchsorted(secondary, (pos[tied] << 32) | (_LOW32 - gc[tied]), side="left")
        # the item is ahead of the row's relevant items at sorted positions [row_start, pos)
        diff += torch.bincount(row_start[r], minlength=n + 1) - torch.bincount(pos, minlength=n + 1)
    ahead = torch.cumsum(diff[:n], 0)
    row_end = row_start + per_row
    hit = row_end[rows] - torch.arange(n)  # 1-based position among the row's relevant items
    return rows, hit, hit + ahead


def _per_query(rows: torch.Tensor, hit: torch.Tensor, rank: torch.Tensor, n_rows: int
               ) -> dict[str, torch.Tensor]:
    """Per-query metrics from each relevant item's hit number and rank (queries without one: NaN)."""
    hit_f, rank_f = hit.double(), rank.double()
    n_rel = torch.bincount(rows, minlength=n_rows).double()

    def per_row(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows, values)

    prec = hit_f / rank_f
    prev = torch.where(rank_f > 1, (hit_f - 1) / (rank_f - 1).clamp(min=1), 1.0)
    in_r = rank_f <= n_rel[rows]
    first = torch.full((n_rows,), math.inf, dtype=torch.float64)
    first.scatter_reduce_(0, rows, rank_f, reduce="amin")
    return {"n_rel": n_rel, "ap": per_row(prec) / n_rel, "ap_trapezoid": per_row((prev + prec) / 2) / n_rel,
            "ap_r": per_row(prec * in_r) / n_rel, "r_prec": per_row(in_r.double()) / n_rel,
            "first": torch.where(n_rel > 0, first, math.nan)}


def _query_blocks(q_order: torch.Tensor, qid: torch.Tensor, g_sorted: torch.Tensor, block: int
                  ) -> Iterator[torch.Tensor]:
    """Query indices in blocks of at most ``block`` queries and MAX_PAIRS same-identity gallery
    items (at least one query): few identities with huge galleries keep the pair arrays bounded."""
    ids = qid[q_order]
    same = torch.searchsorted(g_sorted, ids, side="right") - torch.searchsorted(g_sorted, ids, side="left")
    ends = torch.cumsum(same, 0)
    start = 0
    while start < len(q_order):
        before = int(ends[start - 1]) if start else 0
        fit = int(torch.searchsorted(ends, before + MAX_PAIRS, side="right"))
        stop = min(start + block, max(fit, start + 1), len(q_order))
        yield q_order[start:stop]
        start = stop


def full_ranking(
    query_feats: ArrayLike,
    query_ids: ArrayLike,
    gallery_feats: ArrayLike,
    gallery_ids: ArrayLike,
    *,
    exclude_self: bool = False,
    query_cams: ArrayLike | None = None,
    gallery_cams: ArrayLike | None = None,
    gallery_junk: ArrayLike | None = None,
    block: int = 1024,
    block_gallery: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-query full-ranking results, in query order, each a float64 tensor of length Nq.

    ``n_rel``: relevant items after junk removal (0: the query has no defined AP and is skipped by
    :func:`summarize`); ``ap`` (mean precision at the relevant items' ranks), ``ap_trapezoid`` (the
    Market-1501 MATLAB code's average of the precisions just before and at each hit), ``ap_r``
    (AP@R), ``r_prec`` (R-precision), ``first`` (rank of the best relevant item, 1-based, junk
    removed). Memory: one ``block x block_gallery`` tile (default ``block_gallery`` = 2^24 / block) and
    the block's relevant pairs; features are normalised block by block, never copied whole.
    """
    if block < 1 or (block_gallery is not None and block_gallery < 1):
        raise DataError(f"block sizes must be >= 1, got block={block}, block_gallery={block_gallery}")
    q = as_feature_matrix(query_feats, "query_feats")
    g = as_feature_matrix(gallery_feats, "gallery_feats")
    qid, gid = encode_ids(query_ids, gallery_ids)
    junk = (torch.zeros(g.shape[0], dtype=torch.bool) if gallery_junk is None
            else torch.as_tensor(np.asarray(gallery_junk, dtype=bool)))
    _check(q, g, qid, gid, exclude_self, junk)
    if (query_cams is None) != (gallery_cams is None):
        raise DataError("give both query_cams and gallery_cams, or neither")
    qcam = gcam = None
    if query_cams is not None:
        qcam, gcam = encode_ids(query_cams, gallery_cams)
        if qcam.shape[0] != q.shape[0] or gcam.shape[0] != g.shape[0]:
            raise DataError("query_cams / gallery_cams must have one camera id per feature row")
    bg = block_gallery or max(1, TILE // block)
    tile = block * bg
    g_sorted, g_order = torch.sort(gid, stable=True)
    q_order = torch.sort(qid, stable=True).indices  # blocks of few identities: few relevant columns
    keys = ("n_rel", "ap", "ap_trapezoid", "ap_r", "r_prec", "first")
    out = {k: torch.full((q.shape[0],), math.nan, dtype=torch.float64) for k in keys}
    out["n_rel"].zero_()
    for idx in _query_blocks(q_order, qid, g_sorted, block):
        qb, qid_b = _unit(q[idx]), qid[idx]
        rows, cols = _relevant_pairs(qid_b, None if qcam is None else qcam[idx], idx, g_order, g_sorted,
                                     gcam, junk, exclude_self)
        if not rows.numel():
            continue
        rows, hit, rank = _block_ranks(qb, g, qid_b, gid, junk, rows, cols, bg, tile)
        for k, v in _per_query(rows, hit, rank, len(idx)).items():
            out[k][idx] = v
    return out


def summarize(per: dict[str, torch.Tensor], ks: Sequence[int] = (1, 5, 10), ap: str = "ap"
              ) -> dict[str, float]:
    """Means over the queries with a relevant item: ``map`` (from ``per[ap]``), ``map_at_r``,
    ``r_precision``, ``top{k}`` (CMC: fraction whose best relevant item ranks within k) and
    ``n_queries``; NaN with a warning when no query has a relevant item."""
    has = per["n_rel"] > 0
    n = int(has.sum())
    if n == 0:
        warnings.warn("retrieval: no query has a relevant gallery item; metric is NaN", stacklevel=2)
    out = {"n_queries": float(n)}

    def mean(v: torch.Tensor) -> float:
        return float(v[has].mean()) if n else math.nan

    out["map"] = mean(per[ap])
    out["map_at_r"] = mean(per["ap_r"])
    out["r_precision"] = mean(per["r_prec"])
    for k in ks:
        out[f"top{k}"] = mean((per["first"] <= k).double())
    return out


def top1_hits(per: dict[str, torch.Tensor]) -> torch.Tensor:
    """Whether each query with a relevant item ranks one first (query order): what
    :func:`summarize`'s ``top1`` is the mean of."""
    return (per["first"] <= 1)[per["n_rel"] > 0]


def cmc_from_ranks(first: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """CMC {k: fraction of queries whose best relevant rank is <= k} over queries with a finite rank."""
    valid = torch.isfinite(first)
    if not bool(valid.any()):
        return {int(k): math.nan for k in ks}
    f = first[valid]
    return {int(k): float((f <= k).double().mean()) for k in ks}


def _drop_junk_topk(idx: np.ndarray, qid: np.ndarray, qcam: np.ndarray | None, gid: np.ndarray,
                    gcam: np.ndarray | None, k: int) -> np.ndarray:
    """Per query, the first k indices of a top-k' list after removing same-id-same-camera junk
    (-1 where fewer than k remain)."""
    ok = idx >= 0
    if qcam is not None and gcam is not None:
        safe = np.where(ok, idx, 0)
        ok &= ~((gid[safe] == qid[:, None]) & (gcam[safe] == qcam[:, None]))
    pos = np.cumsum(ok, axis=1) - 1
    out = np.full((idx.shape[0], k), -1, dtype=np.int64)
    r, c = np.nonzero(ok & (pos < k))
    out[r, pos[r, c]] = idx[r, c]
    return out


def indexed_cmc(
    query_feats: ArrayLike,
    query_ids: ArrayLike,
    gallery_feats: ArrayLike,
    gallery_ids: ArrayLike,
    ks: Sequence[int],
    factory: str,
    *,
    nprobe: int | None = None,
    query_cams: ArrayLike | None = None,
    gallery_cams: ArrayLike | None = None,
    gallery_junk: ArrayLike | None = None,
    block: int = 1024,
) -> dict[str, float]:
    """CMC top-k from a faiss index (``factory``, e.g. "IVF1024,Flat", "HNSW32") and the index's
    recall@k against the exact blockwise top-k over the same (junk-free) gallery and queries.

    Returns ``top{k}`` (queries with a relevant item in the gallery), ``index_recall@{k}`` (mean
    fraction of the exact top k the index also returned) and ``n_queries``. Junk is removed as in
    :func:`full_ranking` (queries and gallery distinct sets: no ``exclude_self``).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise DataError(f"ks must be a non-empty list of integers >= 1, got {ks}")
    q = normalized(query_feats, "query_feats")
    g = normalized(gallery_feats, "gallery_feats")
    qid, gid = (t.numpy() for t in encode_ids(query_ids, gallery_ids))
    junk = np.zeros(g.shape[0], bool) if gallery_junk is None else np.asarray(gallery_junk, bool)
    _check(q, g, torch.as_tensor(qid), torch.as_tensor(gid), False, torch.as_tensor(junk))
    keep = np.nonzero(~junk)[0]
    qcam = gcam = None
    if query_cams is not None and gallery_cams is not None:
        qcam, gcam = (t.numpy() for t in encode_ids(query_cams, gallery_cams))
        gcam = gcam[keep]
    gid_k = gid[keep]
    k_max = ks[-1]
    check_k_within_gallery(k_max, len(keep), False)
    # enough extra results to survive the removal of each query's same-id-same-camera junk
    extra = 0
    if qcam is not None:
        pairs = np.unique(np.stack([gid_k, gcam], 1), axis=0, return_counts=True)[1]
        extra = int(pairs.max()) if len(pairs) else 0
    k_search = min(len(keep), k_max + extra)
    gk = g[torch.as_tensor(keep)]
    approx = FaissIndex(gk, factory=factory, nprobe=nprobe).search(q, k_search)[1]
    exact = topk_search(q, gk, k_search, block_queries=block)[1].numpy()
    approx = _drop_junk_topk(approx, qid, qcam, gid_k, gcam, k_max)
    exact = _drop_junk_topk(exact, qid, qcam, gid_k, gcam, k_max)
    n_codes = int(max(qid.max(initial=0), gid_k.max(initial=0))) + 1
    has = np.bincount(gid_k, minlength=n_codes)[qid] > 0
    if qcam is not None and gcam is not None:
        n_cams = int(max(qcam.max(initial=0), gcam.max(initial=0))) + 1
        per_cam = np.bincount(gid_k * n_cams + gcam, minlength=n_codes * n_cams)
        has = np.bincount(gid_k, minlength=n_codes)[qid] - per_cam[qid * n_cams + qcam] > 0
    out: dict[str, float] = {"n_queries": float(has.sum())}
    safe = np.where(approx >= 0, approx, 0)
    hits = (gid_k[safe] == qid[:, None]) & (approx >= 0)
    for k in ks:
        out[f"top{k}"] = float(hits[has, :k].any(1).mean()) if has.any() else math.nan
        inter = [len(np.intersect1d(approx[i, :k][approx[i, :k] >= 0], exact[i, :k][exact[i, :k] >= 0]))
                 / max(1, int((exact[i, :k] >= 0).sum())) for i in range(len(qid))]
        out[f"index_recall@{k}"] = float(np.mean(inter)) if inter else math.nan
    return out
