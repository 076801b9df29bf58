"""CMC and TPIR@FPIR against brute-force Python loops."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from bctkit.errors import DataError
from bctkit.evaluation.identification import cmc, tpir_at_fpir
from bctkit.evaluation.retrieval import recall_at_k


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_cmc(q, qid, g, gid, ks, exclude_self=False):
    q, g = unit(q), unit(g)
    hits = {k: 0 for k in ks}
    n = 0
    for i in range(len(q)):
        items = [j for j in range(len(g)) if not (exclude_self and j == i)]
        if not any(gid[j] == qid[i] for j in items):
            continue
        n += 1
        ranked = sorted(items, key=lambda j: -float(q[i] @ g[j]))
        first = next(r for r, j in enumerate(ranked) if gid[j] == qid[i])
        for k in ks:
            hits[k] += first < k
    return {k: hits[k] / n for k in ks}


def meant(rate: float) -> Fraction:
    """The simplest fraction that rounds to the float ``rate`` (0.57 -> 57/100), by search."""
    for q in itertools.count(1):
        p = round(rate * q)
        if float(Fraction(p, q)) == rate:
            return Fraction(p, q)
    raise AssertionError("unreachable")


def brute_tpir(q, qid, g, gid, fpirs):
    q, g = unit(q), unit(g)
    enrolled = set(gid.tolist())
    nm_max, mated = [], []
    for i in range(len(q)):
        scores = [float(q[i] @ g[j]) for j in range(len(g))]
        if qid[i] in enrolled:
            mated_score = max(s for s, j in zip(scores, gid, strict=True) if j == qid[i])
            others = [s for s, j in zip(scores, gid, strict=True) if j != qid[i]]
            # strictly above every non-mated gallery score: a tie is a miss
            mated.append((mated_score, all(mated_score > s for s in others)))
        else:
            nm_max.append(max(scores))
    nm_max.sort(reverse=True)
    out = {}
    for f in fpirs:
        k = max(math.floor(meant(f) * len(nm_max)), 1)
        thr = nm_max[k - 1]
        out[f] = sum(1 for s, top in mated if top and s > thr) / len(mated)
    return out


def data(seed: int, n_q: int = 60, n_g: int = 90, d: int = 12, n_id: int = 25):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_id + 10, d))
    gid = rng.integers(0, n_id, n_g)
    qid = rng.integers(0, n_id + 10, n_q)  # ids >= n_id are not enrolled
    g = (centers[gid] + 0.9 * rng.normal(size=(n_g, d))).astype(np.float32)
    q = (centers[qid] + 0.9 * rng.normal(size=(n_q, d))).astype(np.float32)
    return q, qid, g, gid


@pytest.mark.parametrize("seed", range(4))
def test_cmc_matches_brute_force(seed: int) -> None:
    q, qid, g, gid = data(seed)
    ks = (1, 2, 5, 10, 90)
    got = cmc(torch.from_numpy(q), qid, g, gid, ks=ks, block_queries=7, block_gallery=13)
    want = brute_cmc(q.astype(np.float64), qid, g.astype(np.float64), gid, ks)
    for k in ks:
        assert got[k] == pytest.approx(want[k], abs=1e-12)
    assert got[90] == 1.0  # the whole gallery


@pytest.mark.parametrize("seed", range(3))
def test_cmc_exclude_self_matches_brute_force(seed: int) -> None:
    _, _, g, gid = data(seed, n_g=70)
    ks = (1, 3, 10)
    got = cmc(g, gid, g, gid, ks=ks, exclude_self=True, block_queries=8, block_gallery=9)
    want = brute_cmc(g.astype(np.float64), gid, g.astype(np.float64), gid, ks, exclude_self=True)
    for k in ks:
        assert got[k] == pytest.approx(want[k], abs=1e-12)
    # without exclusion every item finds itself first
    assert cmc(g, gid, g, gid, ks=(1,))[1] == 1.0


def test_cmc_string_ids_and_absent_probes() -> None:
    q, qid, g, gid = data(5)
    names = np.array([f"person{i:03d}" for i in range(40)])
    got = cmc(q, names[qid], g, names[gid], ks=(1, 5))
    assert got == cmc(q, qid, g, gid, ks=(1, 5))
    with pytest.warns(UserWarning, match="no probe identity"):
        out = cmc(q, qid + 1000, g, gid, ks=(1,))
    assert math.isnan(out[1])


@pytest.mark.parametrize("seed", range(4))
def test_tpir_matches_brute_force(seed: int) -> None:
    q, qid, g, gid = data(seed, n_q=120)
    fpirs = [0.001, 0.01, 0.05, 0.1, 0.3, 1.0]
    got = tpir_at_fpir(q, qid, g, gid, fpirs, block_queries=11, block_gallery=17)
    want = brute_tpir(q.astype(np.float64), qid, g.astype(np.float64), gid, fpirs)
    for f in fpirs:
        assert got[f] == pytest.approx(want[f], abs=1e-12)


def test_tpir_hand_example() -> None:
    # 1-D features on the unit circle: score = cos(angle difference).
    ang = lambda a: np.array([[np.cos(x), np.sin(x)] for x in a])  # noqa: E731
    g = ang([0.0, 1.0, 2.0])  # ids 0, 1, 2
    gid = np.array([0, 1, 2])
    # mated probes: near 0 (hit), near 1 but closer to 2 (rank-1 miss), near 2 (weak score)
    # non-mated probes: best scores cos(0.1), cos(0.4), cos(0.6), cos(0.8)
    q = ang([0.05, 1.6, 2.5, 0.1, 1.4, 2.6, -0.8])
    qid = np.array([0, 1, 2, 9, 9, 9, 9])
    got = tpir_at_fpir(q, qid, g, gid, [0.25, 0.5, 1.0])
    # f=0.25: k=1, thr=cos(0.1): only probe 0 (score cos(0.05)) passes -> 1/3
    # f=0.5: k=2, thr=cos(0.4): probe 0 passes; probe 2 score cos(0.5) < thr -> 1/3
    # f=1.0: k=4, thr=cos(0.8): probes 0 and 2 -> 2/3; probe 1 is not rank-1 -> never counts
    assert got == pytest.approx({0.25: 1 / 3, 0.5: 1 / 3, 1.0: 2 / 3})


def test_errors() -> None:
    q, qid, g, gid = data(0)
    with pytest.raises(DataError, match="empty"):
        cmc(q, qid, g[:0], gid[:0])
    with pytest.raises(DataError, match="dim"):
        cmc(q[:, :5], qid, g, gid)
    bad = q.copy()
    bad[2, 3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        cmc(bad, qid, g, gid)
    with pytest.raises(DataError, match="labels"):
        cmc(q, qid[:-1], g, gid)
    with pytest.raises(DataError, match="empty"):
        tpir_at_fpir(q, qid, g[:0], gid[:0], [0.1])
    with pytest.raises(DataError, match="no non-mated"):
        tpir_at_fpir(g, gid, g, gid, [0.1])
    with pytest.raises(DataError, match="no mated"):
        tpir_at_fpir(q, qid + 1000, g, gid, [0.1])
    with pytest.raises(DataError, match="dim"):
        tpir_at_fpir(q, qid, g[:, :3], gid, [0.1])


def test_tpir_ties_are_misses() -> None:
    g = np.array([[1.0, 0.0], [0.0, 1.0]])
    gid = np.array([0, 1])
    # mated probe equal to a non-mated probe: its score equals the threshold -> not a hit
    q = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert tpir_at_fpir(q, np.array([0, 9]), g, gid, [1.0]) == {1.0: 0.0}
    # a mated score tied with a non-mated gallery item's score is not strictly greater -> a miss
    q = np.array([[1.0, 1.0], [-1.0, -1.0]])
    assert brute_tpir(q, np.array([0, 9]), g, gid, [1.0]) == {1.0: 0.0}
    assert tpir_at_fpir(q, np.array([0, 9]), g, gid, [1.0]) == {1.0: 0.0}
    # two gallery items of the probe's own identity tied at the top are no tie with a non-mated item
    g = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    gid = np.array([0, 0, 1])
    q = np.array([[1.0, 0.0], [-1.0, -1.0]])
    assert tpir_at_fpir(q, np.array([0, 9]), g, gid, [1.0]) == {1.0: 1.0}


@pytest.mark.parametrize(("fpir", "n_nm"), [(0.57, 100), (0.29, 100), (0.58, 100), (0.7, 90)])
def test_tpir_exact_floor_of_fpir_times_non_mated(fpir: float, n_nm: int) -> None:
    # float fpir * n_nm lands just below the integer (0.57 * 100 = 56.99999...); the rule is exact
    k = math.floor(meant(fpir) * n_nm)
    assert math.floor(fpir * n_nm) == k - 1
    ang = lambda a: np.array([[np.cos(x), np.sin(x)] for x in a])  # noqa: E731
    g = ang([0.0])
    # non-mated maxima cos(0.01 i), i = 1..n_nm: the k-th largest is cos(0.01 k); the mated probe
    # scores between the k-th and the (k-1)-th largest, so it passes the threshold only at k
    q = ang([0.01 * (k - 0.5)] + [0.01 * i for i in range(1, n_nm + 1)])
    qid = np.r_[0, np.full(n_nm, 9)]
    assert brute_tpir(q, qid, g, np.array([0]), [fpir]) == {fpir: 1.0}
    assert tpir_at_fpir(q, qid, g, np.array([0]), [fpir]) == {fpir: 1.0}


def tie_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One-hot gallery with many duplicates: scores are exact, so equal scores are true ties."""
    rng = np.random.default_rng(3)
    basis = rng.integers(0, 3, 150)
    g = np.eye(3)[basis]
    gid = rng.integers(0, 30, 150)
    q = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [3.0, 2.0, 1.0], [0.0, 0.0, 1.0]] * 6)
    qid = rng.integers(0, 30, q.shape[0])
    return q, qid, g, gid


@pytest.mark.parametrize(("bq", "bg"), [(1024, 32768), (4, 7), (3, 64)])
def test_cmc_ties_lower_gallery_index_first(bq: int, bg: int) -> None:
    q, qid, g, gid = tie_data()
    ks = (1, 2, 3, 5, 10, 40)
    want = brute_cmc(q, qid, g, gid, ks)  # sorted() is stable: equal scores keep gallery order
    got = cmc(q, qid, g, gid, ks=ks, block_queries=bq, block_gallery=bg)
    assert got == pytest.approx(want, abs=1e-12)
    assert got == pytest.approx(recall_at_k(q, qid, g, gid, ks=ks), abs=1e-12)


def test_cmc_k_larger_than_gallery_raises() -> None:
    q, qid, g, gid = data(0, n_g=20)
    assert cmc(q, qid, g, gid, ks=(1, 20))[20] == 1.0
    with pytest.raises(DataError, match="k=21.*gallery size 20"):
        cmc(q, qid, g, gid, ks=(1, 21))
    with pytest.raises(DataError, match="k=20.*gallery size 20"):
        cmc(g, gid, g, gid, ks=(20,), exclude_self=True)  # 19 items left to each probe
    assert cmc(g, gid, g, gid, ks=(19,), exclude_self=True)[19] == 1.0


def test_cmc_without_queries_is_nan() -> None:
    _, _, g, gid = data(0)
    with pytest.warns(UserWarning, match="no probe identity"):
        out = cmc(g[:0], gid[:0], g, gid, ks=(1, 5))
    assert math.isnan(out[1]) and math.isnan(out[5])
