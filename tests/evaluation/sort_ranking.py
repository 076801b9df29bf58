"""The plain full-ranking retrieval metrics: every query's whole row of scores sorted (stable, so
equal scores keep the lower gallery index first), junk dropped, precision counted from the ranked
relevance. The independent computation the bounded-memory ranking of
:mod:`bctkit.evaluation.blockwise` (behind :mod:`bctkit.evaluation.retrieval`) is checked against.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from bctkit.errors import DataError
from bctkit.evaluation.search import ArrayLike, check_k_within_gallery, check_pair, encode_ids, normalized

MAX_TILE = 1 << 22


def _ranked_relevance(
    query_feats: ArrayLike,
    query_ids: ArrayLike,
    gallery_feats: ArrayLike,
    gallery_ids: ArrayLike,
    exclude_self: bool,
    query_cams: ArrayLike | None,
    gallery_cams: ArrayLike | None,
    block_queries: int | None,
    max_k: int = 0,
):
    """Yield (rel, valid) boolean blocks in ranked order, for queries with >= 1 relevant item.

    rel[i, r]: the item ranked r for query i is relevant; valid[i, r]: it is not junk. ``max_k``:
    the largest K of Recall@K, checked against the gallery size.
    """
    q = normalized(query_feats, "query_feats")
    g = normalized(gallery_feats, "gallery_feats")
    check_pair(q, g, "query_feats", "gallery_feats")
    qid, gid = encode_ids(query_ids, gallery_ids)
    for ids, feats, name in ((qid, q, "query_ids"), (gid, g, "gallery_ids")):
        if ids.shape[0] != feats.shape[0]:
            raise DataError(f"{name} has {ids.shape[0]} labels for {feats.shape[0]} feature rows")
    if exclude_self and q.shape[0] != g.shape[0]:
        raise DataError("exclude_self needs query and gallery sets of equal length")
    if max_k:
        check_k_within_gallery(max_k, g.shape[0], exclude_self)
    if (query_cams is None) != (gallery_cams is None):
        raise DataError("give both query_cams and gallery_cams, or neither")
    qcam = gcam = None
    if query_cams is not None:
        qcam, gcam = encode_ids(query_cams, gallery_cams)
        if qcam.shape[0] != q.shape[0] or gcam.shape[0] != g.shape[0]:
            raise DataError("query_cams / gallery_cams must have one camera id per feature row")
    n_g = g.shape[0]
    bq = block_queries or max(1, MAX_TILE // n_g)
    for qs in range(0, q.shape[0], bq):
        qb = q[qs : qs + bq]
        order = torch.sort(qb @ g.T, dim=1, descending=True, stable=True).indices
        same = gid[order] == qid[qs : qs + bq, None]
        valid = torch.ones_like(same)
        if qcam is not None:
            valid &= ~(same & (gcam[order] == qcam[qs : qs + bq, None]))
        if exclude_self:
            valid &= order != torch.arange(qs, qs + qb.shape[0])[:, None]
        rel = same & valid
        has = rel.any(1)
        yield rel[has], valid[has]


def _per_query(rel: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query AP, AP@R, R-precision and the rank (1-based, junk removed) of the first hit."""
    rank = torch.cumsum(valid, dim=1, dtype=torch.float64)
    cum_rel = torch.cumsum(rel, dim=1, dtype=torch.float64)
    n_rel = cum_rel[:, -1]
    prec = torch.where(rel, cum_rel / rank.clamp(min=1), 0.0)
    ap = prec.sum(1) / n_rel
    in_r = rank <= n_rel[:, None]
    ap_r = (prec * in_r).sum(1) / n_rel
    r_prec = (rel & in_r).sum(1, dtype=torch.float64) / n_rel
    first = torch.where(rel, rank, math.inf).min(1).values
    return {"ap": ap, "ap_r": ap_r, "r_prec": r_prec, "first": first}


def _collect(args: tuple, kwargs: dict) -> dict[str, torch.Tensor] | None:
    parts: dict[str, list[torch.Tensor]] = {}
    for rel, valid in _ranked_relevance(*args, **kwargs):
        for key, val in _per_query(rel, valid).items():
            parts.setdefault(key, []).append(val)
    if not parts or sum(p.shape[0] for p in parts["ap"]) == 0:
        warnings.warn("retrieval: no query has a relevant gallery item; metric is NaN", stacklevel=3)
        return None
    return {key: torch.cat(vals) for key, vals in parts.items()}


def _mean(per: dict[str, torch.Tensor] | None, key: str) -> float:
    return math.nan if per is None else float(per[key].mean())


def retrieval_metrics(
    query_feats: ArrayLike,
    query_ids: ArrayLike,
    gallery_feats: ArrayLike,
    gallery_ids: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
    exclude_self: bool = False,
    query_cams: ArrayLike | None = None,
    gallery_cams: ArrayLike | None = None,
    block_queries: int | None = None,
) -> dict[str, float]:
    """All retrieval metrics from one ranking pass: mAP, mAP@R, R-precision, recall@k, n_queries."""
    ks = [int(k) for k in ks]
    if ks and min(ks) < 1:
        raise DataError(f"ks must be integers >= 1, got {ks}")
    per = _collect(
        (query_feats, query_ids, gallery_feats, gallery_ids),
        dict(
            exclude_self=exclude_self,
            query_cams=query_cams,
            gallery_cams=gallery_cams,
            block_queries=block_queries,
            max_k=max(ks, default=0),
        ),
    )
    out = {
        "map": _mean(per, "ap"),
        "map_at_r": _mean(per, "ap_r"),
        "r_precision": _mean(per, "r_prec"),
        "n_queries": 0.0 if per is None else float(per["ap"].shape[0]),
    }
    for k in ks:
        out[f"recall@{k}"] = math.nan if per is None else float((per["first"] <= k).double().mean())
    return out
