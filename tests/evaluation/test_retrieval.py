"""Retrieval metrics against sklearn's average_precision_score and written definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from bctkit.errors import DataError
from bctkit.evaluation.retrieval import (
    map_at_r,
    mean_average_precision,
    r_precision,
    recall_at_k,
    retrieval_metrics,
)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def data(seed: int, n_q: int = 30, n_g: int = 70, d: int = 10, n_id: int = 12):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_id + 5, d))
    gid = rng.integers(0, n_id, n_g)
    qid = rng.integers(0, n_id + 5, n_q)  # some queries have no relevant item
    g = centers[gid] + 1.2 * rng.normal(size=(n_g, d))
    q = centers[qid] + 1.2 * rng.normal(size=(n_q, d))
    qcam = rng.integers(0, 3, n_q)
    gcam = rng.integers(0, 3, n_g)
    return q, qid, g, gid, qcam, gcam


def per_query_lists(q, qid, g, gid, exclude_self=False, qcam=None, gcam=None):
    """(relevance in ranked order, sklearn AP) per query with a relevant item, junk removed."""
    s = unit(q) @ unit(g).T
    out = []
    for i in range(len(q)):
        keep = np.ones(len(g), bool)
        if exclude_self:
            keep[i] = False
        if qcam is not None:
            keep &= ~((gid == qid[i]) & (gcam == qcam[i]))
        rel = gid[keep] == qid[i]
        if not rel.any():
            continue
        sc = s[i, keep]
        ranked_rel = rel[np.argsort(-sc, kind="stable")]
        out.append((ranked_rel, average_precision_score(rel, sc)))
    return out


def brute_map_at_r(ranked_rel: np.ndarray) -> float:
    r = int(ranked_rel.sum())
    total = 0.0
    for i in range(1, r + 1):
        if ranked_rel[i - 1]:
            total += ranked_rel[:i].sum() / i
    return total / r


def brute_r_precision(ranked_rel: np.ndarray) -> float:
    r = int(ranked_rel.sum())
    return ranked_rel[:r].sum() / r


CASES = [
    {},
    {"exclude_self": True},
    {"cams": True},
    {"exclude_self": True, "cams": True},
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", CASES)
def test_against_definitions(seed: int, case: dict) -> None:
    q, qid, g, gid, qcam, gcam = data(seed)
    if case.get("exclude_self"):
        q, qid, qcam = g, gid, gcam
    kw = {"exclude_self": case.get("exclude_self", False), "block_queries": 7 if seed == 0 else None}
    if case.get("cams"):
        kw.update(query_cams=qcam, gallery_cams=gcam)
    ref = per_query_lists(
        q,
        qid,
        g,
        gid,
        exclude_self=kw["exclude_self"],
        qcam=qcam if case.get("cams") else None,
        gcam=gcam if case.get("cams") else None,
    )
    want_map = np.mean([ap for _, ap in ref])
    want_mapr = np.mean([brute_map_at_r(r) for r, _ in ref])
    want_rp = np.mean([brute_r_precision(r) for r, _ in ref])
    ks = (1, 5, 20)
    want_rec = {k: np.mean([r[:k].any() for r, _ in ref]) for k in ks}

    assert mean_average_precision(q, qid, g, gid, **kw) == pytest.approx(want_map, abs=1e-9)
    assert map_at_r(q, qid, g, gid, **kw) == pytest.approx(want_mapr, abs=1e-9)
    assert r_precision(q, qid, g, gid, **kw) == pytest.approx(want_rp, abs=1e-9)
    got_rec = recall_at_k(q, qid, g, gid, ks=ks, **kw)
    for k in ks:
        assert got_rec[k] == pytest.approx(want_rec[k], abs=1e-12)
    allm = retrieval_metrics(q, qid, g, gid, ks=ks, **kw)
    assert allm["map"] == pytest.approx(want_map, abs=1e-9)
    assert allm["n_queries"] == len(ref)
    assert allm["recall@5"] == pytest.approx(want_rec[5], abs=1e-12)


def test_perfect_and_worst_ranking() -> None:
    g = np.eye(4)
    gid = np.array([0, 0, 1, 1])
    q = np.array([[1.0, 0.9, 0.0, 0.0]])
    assert mean_average_precision(q, [0], g, gid) == pytest.approx(1.0)
    assert map_at_r(q, [0], g, gid) == pytest.approx(1.0)
    # relevant items ranked 3rd and 4th: AP = (1/3 + 2/4) / 2, mAP@R = 0, R-precision = 0
    q = np.array([[0.0, 0.0, 1.0, 0.9]])
    assert mean_average_precision(q, [0], g, gid) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert map_at_r(q, [0], g, gid) == 0.0
    assert r_precision(q, [0], g, gid) == 0.0
    assert recall_at_k(q, [0], g, gid, ks=(2, 3)) == {2: 0.0, 3: 1.0}


def test_junk_same_camera_is_ignored() -> None:
    g = np.eye(3)
    gid = np.array([0, 0, 1])
    q = np.array([[1.0, 0.5, 0.7]])
    # item 0 (same id, same camera) is junk: ranking becomes item 2 (irrelevant), item 1 (relevant)
    got = mean_average_precision(q, [0], g, gid, query_cams=[5], gallery_cams=[5, 6, 6])
    assert got == pytest.approx(0.5)
    assert mean_average_precision(q, [0], g, gid) == pytest.approx((1 + 2 / 3) / 2)


def test_no_relevant_query_is_nan_with_warning() -> None:
    q, qid, g, gid, _, _ = data(0)
    with pytest.warns(UserWarning, match="no query has a relevant"):
        assert math.isnan(mean_average_precision(q, qid + 100, g, gid))


def test_ties_rank_lower_gallery_index_first() -> None:
    # three gallery items tie with the query; the relevant one has the highest index -> rank 3
    g = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    gid = np.array([1, 2, 0, 3])
    q = np.array([[1.0, 0.0]])
    assert recall_at_k(q, [0], g, gid, ks=(1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}
    assert mean_average_precision(q, [0], g, gid) == pytest.approx(1 / 3)


def test_recall_k_larger_than_gallery_raises() -> None:
    q, qid, g, gid, _, _ = data(2, n_g=20)
    assert recall_at_k(q, qid, g, gid, ks=(1, 20))[20] == 1.0
    with pytest.raises(DataError, match="k=21.*gallery size 20"):
        recall_at_k(q, qid, g, gid, ks=(1, 21))
    with pytest.raises(DataError, match="k=21.*gallery size 20"):
        retrieval_metrics(q, qid, g, gid, ks=(21,))
    with pytest.raises(DataError, match="k=20.*gallery size 20"):
        recall_at_k(g, gid, g, gid, ks=(20,), exclude_self=True)  # 19 items left to each query
    assert recall_at_k(g, gid, g, gid, ks=(19,), exclude_self=True)[19] == 1.0


def test_errors() -> None:
    q, qid, g, gid, qcam, gcam = data(1)
    with pytest.raises(DataError, match="empty"):
        mean_average_precision(q, qid, g[:0], gid[:0])
    with pytest.raises(DataError, match="dim"):
        map_at_r(q[:, :4], qid, g, gid)
    bad = g.copy()
    bad[0, 0] = np.inf
    with pytest.raises(DataError, match="NaN or Inf"):
        r_precision(q, qid, bad, gid)
    with pytest.raises(DataError, match="equal length"):
        recall_at_k(q, qid, g, gid, exclude_self=True)
    with pytest.raises(DataError, match="both"):
        mean_average_precision(q, qid, g, gid, query_cams=qcam)
    with pytest.raises(DataError, match="labels"):
        mean_average_precision(q, qid[:-1], g, gid)
