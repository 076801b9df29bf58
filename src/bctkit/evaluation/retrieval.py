"""Retrieval metrics over the full ranking (evaluation.md, "Retrieval").

Definitions (cosine similarity; each query ranks the whole gallery by decreasing score, equal scores
with the lower gallery index first: a stable sort, the rule CMC and topk_search follow too):

- relevant: gallery items with the query's identity. Junk items are removed from the ranking before
  anything is counted: the query's own item when ``exclude_self`` (query i is gallery i), and,
  Market-1501 style when camera ids are given, items with the same identity AND the same camera.
- Queries with no relevant gallery item are skipped (they have no defined AP); the metrics average
  over the remaining queries and are NaN, with a warning, when none remains.
- AP = mean over the relevant items of precision at their rank; mAP = mean AP.
- mAP@R (Musgrave et al. 2020): R = number of relevant items; (1/R) sum_{i<=R} rel(i) P(i).
- R-precision: (number of relevant items in the top R) / R.
- Recall@K: fraction of queries with at least one relevant item in the top K (the metric-learning
  convention, not the fraction of relevant items retrieved). K larger than the gallery (less the
  query's own item with ``exclude_self``) is a DataError, not a trivial 100 %.

Computed by the one full-ranking implementation, :func:`bctkit.evaluation.blockwise.full_ranking`
(exact, in memory bounded by the block sizes); these functions are its plain-argument front.
"""

from __future__ import annotations

from collections.abc import Sequence

from bctkit.errors import DataError
from bctkit.evaluation.blockwise import full_ranking, summarize
from bctkit.evaluation.search import ArrayLike, check_k_within_gallery


def mean_average_precision(
    query_feats: ArrayLike,
    query_ids: ArrayLike,
    gallery_feats: ArrayLike,
    gallery_ids: ArrayLike,
    exclude_self: bool = False,
    query_cams: ArrayLike | None = None,
    gallery_cams: ArrayLike | None = None,
    block_queries: int | None = None,
) -> float:
    """mAP over the full ranking (junk removed; queries without relevant items skipped)."""
    return retrieval_metrics(
        query_feats, query_ids, gallery_feats, gallery_ids, ks=(), exclude_self=exclude_self,
        query_cams=query_cams, gallery_cams=gallery_cams, block_queries=block_queries,
    )["map"]


def map_at_r(
    query_feats: ArrayLike,
    query_ids: ArrayLike,
    gallery_feats: ArrayLike,
    gallery_ids: ArrayLike,
    exclude_self: bool = False,
    query_cams: ArrayLike | None = None,
    gallery_cams: ArrayLike | None = None,
    block_queries: int | None = None,
) -> float:
    """mAP@R: (1/R) sum over the top R ranks of rel(i) P(i), R = number of relevant items."""
    return retrieval_metrics(
        query_feats, query_ids, gallery_feats, gallery_ids, ks=(), exclude_self=exclude_self,
        query_cams=query_cams, gallery_cams=gallery_cams, block_queries=block_queries,
    )["map_at_r"]


def r_precision(
    query_feats: ArrayLike,
    query_ids: ArrayLike,
    gallery_feats: ArrayLike,
    gallery_ids: ArrayLike,
    exclude_self: bool = False,
    query_cams: ArrayLike | None = None,
    gallery_cams: ArrayLike | None = None,
    block_queries: int | None = None,
) -> float:
    """R-precision: fraction of the top R ranks that are relevant, R = number of relevant items."""
    return retrieval_metrics(
        query_feats, query_ids, gallery_feats, gallery_ids, ks=(), exclude_self=exclude_self,
        query_cams=query_cams, gallery_cams=gallery_cams, block_queries=block_queries,
    )["r_precision"]


def recall_at_k(
    query_feats: ArrayLike,
    query_ids: ArrayLike,
    gallery_feats: ArrayLike,
    gallery_ids: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
    exclude_self: bool = False,
    query_cams: ArrayLike | None = None,
    gallery_cams: ArrayLike | None = None,
    block_queries: int | None = None,
) -> dict[int, float]:
    """Recall@K {k: fraction of queries with a relevant item in the top k (junk removed)}."""
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise DataError(f"ks must be a non-empty list of integers >= 1, got {ks}")
    out = retrieval_metrics(
        query_feats, query_ids, gallery_feats, gallery_ids, ks=ks, exclude_self=exclude_self,
        query_cams=query_cams, gallery_cams=gallery_cams, block_queries=block_queries,
    )
    return {k: out[f"recall@{k}"] for k in ks}


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
    per = full_ranking(
        query_feats, query_ids, gallery_feats, gallery_ids, exclude_self=exclude_self,
        query_cams=query_cams, gallery_cams=gallery_cams, block=block_queries or 1024,
    )
    if ks:
        check_k_within_gallery(max(ks), len(gallery_feats), exclude_self)
    summary = summarize(per, ks=ks)
    out = {key: summary[key] for key in ("map", "map_at_r", "r_precision", "n_queries")}
    for k in ks:
        out[f"recall@{k}"] = summary[f"top{k}"]
    return out
