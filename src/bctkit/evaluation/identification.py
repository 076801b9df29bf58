"""1:N identification metrics (evaluation.md, "1:N identification").

Features are compared by cosine similarity (rows are L2-normalised here). Identities may be any
labels (ints or strings). All searches run blockwise, so memory stays bounded for large galleries.

- Closed set (CMC): top-k = fraction of probes whose identity appears among the k best-scored
  gallery items; probes whose identity is absent from the gallery are excluded. Equal scores rank
  the lower gallery index first (a stable sort by decreasing score, the rule of topk_search and of
  the retrieval metrics). k larger than the gallery is a DataError, not a trivial 100 %.
- Open set (TPIR@FPIR, NIST style): a probe whose identity is not enrolled is a non-mated search.
  The threshold at FPIR f is the k-th largest of the non-mated searches' maximum scores, with
  k = max(floor(f N_nm), 1), floor taken exactly (see verification.floor_rate_count). A mated search
  is a true positive identification iff its mated score (best score over gallery items of its
  identity) is strictly greater than every non-mated gallery score (a tie is a miss) and strictly
  greater than the threshold. TPIR = true positives / N_mated. One gallery per call: average G1 and
  G2 yourself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from bctkit.errors import DataError
from bctkit.evaluation.search import (
    ArrayLike,
    check_k_within_gallery,
    check_pair,
    encode_ids,
    normalized,
    topk_search,
)
from bctkit.evaluation.verification import floor_rate_count


def _check_ids(feats: torch.Tensor, ids: torch.Tensor, f_name: str, i_name: str) -> None:
    if ids.shape[0] != feats.shape[0]:
        raise DataError(
            f"{i_name} has {ids.shape[0]} labels but {f_name} has {feats.shape[0]} rows; "
            "expected one label per row"
        )


def cmc(
    query_feats: ArrayLike,
    query_ids: ArrayLike,
    gallery_feats: ArrayLike,
    gallery_ids: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
    exclude_self: bool = False,
    block_queries: int = 1024,
    block_gallery: int = 32768,
    hits_out: list[torch.Tensor] | None = None,
) -> dict[int, float]:
    """Closed-set CMC {k: fraction of probes whose identity is among the top-k gallery items}.
    ``hits_out``: receives the counted probes' top-1 hits (bool, probe order), whose mean is top-1.

    Probes whose identity is absent from the gallery (after removing the probe itself when
    ``exclude_self``: query i and gallery i are the same item) are excluded; NaN with a warning when
    no probe remains. Equal scores rank the lower gallery index first. DataError when a k exceeds
    the number of gallery items a probe searches.
    """
    q = normalized(query_feats, "query_feats")
    g = normalized(gallery_feats, "gallery_feats")
    check_pair(q, g, "query_feats", "gallery_feats")
    qid, gid = encode_ids(query_ids, gallery_ids)
    _check_ids(q, qid, "query_feats", "query_ids")
    _check_ids(g, gid, "gallery_feats", "gallery_ids")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise DataError(f"ks must be a non-empty list of integers >= 1, got {ks}")
    if exclude_self and q.shape[0] != g.shape[0]:
        raise DataError("exclude_self needs query and gallery sets of equal length")
    check_k_within_gallery(max(ks), g.shape[0], exclude_self)
    if qid.numel():
        counts = torch.bincount(gid, minlength=int(max(qid.max(), gid.max())) + 1)
        keep = counts[qid] - (1 if exclude_self else 0) > 0
    else:
        keep = torch.zeros(0, dtype=torch.bool)
    if not bool(keep.any()):
        warnings.warn("cmc: no probe identity is present in the gallery; CMC is NaN", stacklevel=2)
        return {k: math.nan for k in ks}
    _, top = topk_search(
        q,
        g,
        max(ks),
        block_queries=block_queries,
        block_gallery=block_gallery,
        exclude_self=exclude_self,
    )
    hit = gid[top] == qid[:, None]
    hit = hit[keep]
    kmax = hit.shape[1]
    first = torch.where(hit.any(1), hit.to(torch.uint8).argmax(1), kmax)
    if hits_out is not None:  # each counted probe's top-1 hit, in probe order
        hits_out.append(first < 1)
    return {k: float((first < k).double().mean()) for k in ks}


def _max_scores(
    q: torch.Tensor,
    g: torch.Tensor,
    qid: torch.Tensor,
    gid: torch.Tensor,
    block_queries: int,
    block_gallery: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per probe: (best score over the whole gallery, best over gallery items of other identities).

    The mated score beats every non-mated gallery score strictly iff best > other, and is then
    equal to best; so these two maxima decide the NIST rule without a third pass over the scores.
    """
    n_q = q.shape[0]
    best = torch.full((n_q,), -torch.inf)
    other = torch.full((n_q,), -torch.inf)
    for qs in range(0, n_q, block_queries):
        qb = q[qs : qs + block_queries]
        qi = qid[qs : qs + block_queries, None]
        b = best[qs : qs + block_queries]
        o = other[qs : qs + block_queries]
        for gs in range(0, g.shape[0], block_gallery):
            sc = qb @ g[gs : gs + block_gallery].T
            torch.maximum(b, sc.max(1).values, out=b)
            sc.masked_fill_(gid[None, gs : gs + block_gallery] == qi, -torch.inf)
            torch.maximum(o, sc.max(1).values, out=o)
    return best, other


def tpir_at_fpir(
    probe_feats: ArrayLike,
    probe_ids: ArrayLike,
    gallery_feats: ArrayLike,
    gallery_ids: ArrayLike,
    fpirs: Sequence[float],
    block_queries: int = 1024,
    block_gallery: int = 32768,
) -> dict[float, float]:
    """Open-set TPIR at each FPIR for one gallery (NIST rule, see the module docstring).

    Needs at least one mated and one non-mated probe (DataError otherwise).
    """
    q = normalized(probe_feats, "probe_feats")
    g = normalized(gallery_feats, "gallery_feats")
    check_pair(q, g, "probe_feats", "gallery_feats")
    qid, gid = encode_ids(probe_ids, gallery_ids)
    _check_ids(q, qid, "probe_feats", "probe_ids")
    _check_ids(g, gid, "gallery_feats", "gallery_ids")
    is_mated = torch.isin(qid, gid)
    n_mated = int(is_mated.sum())
    n_nm = q.shape[0] - n_mated
    if n_mated == 0:
        raise DataError("tpir_at_fpir: no probe identity is enrolled (no mated search)")
    if n_nm == 0:
        raise DataError("tpir_at_fpir: every probe identity is enrolled (no non-mated search)")
    for f in fpirs:
        if not (f >= 0 and math.isfinite(f)):
            raise DataError(f"FPIR {f!r} is invalid; expected a finite number >= 0")
    best, other = _max_scores(q, g, qid, gid, block_queries, block_gallery)
    nm_max = torch.sort(best[~is_mated], descending=True).values
    # strict: a mated score tied with a non-mated gallery score is a miss; when it passes, the
    # mated score is the probe's best score
    mated_scores = best[is_mated]
    above_others = mated_scores > other[is_mated]
    out: dict[float, float] = {}
    for f in fpirs:
        k = min(max(floor_rate_count(f, n_nm), 1), n_nm)
        thr = nm_max[k - 1]
        out[f] = float((above_others & (mated_scores > thr)).double().sum()) / n_mated
    return out
