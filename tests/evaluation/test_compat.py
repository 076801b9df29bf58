"""Compatibility matrix arithmetic and partial backfill against written definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from bctkit.errors import DataError
from bctkit.evaluation.compat import (
    chain_metrics,
    compatibility_matrix,
    compute_matrix,
    criterion,
    partial_backfill_curve,
    update_gain,
)
from bctkit.evaluation.identification import cmc


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_compatibility_matrix_from_pairs() -> None:
    vals = {("old", "old"): 0.5, ("new", "old"): 0.6, ("new", "new"): 0.8}
    m, names = compatibility_matrix(vals)
    assert names == ["old", "new"]
    assert m[0, 0] == 0.5 and m[1, 0] == 0.6 and m[1, 1] == 0.8 and math.isnan(m[0, 1])
    m2, names2 = compatibility_matrix(vals, names=["new", "old"])
    assert m2[0, 1] == 0.6 and names2 == ["new", "old"]
    with pytest.raises(DataError, match="missing"):
        compatibility_matrix(vals, names=["old"])


def test_compute_matrix_calls_metric_for_every_pair() -> None:
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(10), 4)
    f = {name: (rng.normal(size=(40, 6)), rng.normal(size=(40, 6))) for name in ("a", "b")}

    def top1(q, g):
        return cmc(q, ids, g, ids, ks=(1,))[1]

    m, names = compute_matrix(top1, f)
    for i, qn in enumerate(names):
        for j, gn in enumerate(names):
            assert m[i, j] == top1(f[qn][0], f[gn][1])


def test_criterion_and_update_gain() -> None:
    m = np.array([[0.5, 0.0], [0.6, 0.9]])
    assert criterion(m, new=1, old=0)
    m[1, 0] = 0.5
    assert not criterion(m, new=1, old=0)  # strict: equal is not compatible
    m[1, 0] = np.nan
    assert not criterion(m, new=1, old=0)
    assert update_gain(0.6, 0.5, 0.9) == pytest.approx(0.25)
    assert update_gain(0.5, 0.5, 0.9) is None
    assert update_gain(0.4, 0.5, 0.9) is None
    assert update_gain(0.6, 0.5, 0.5) is None


def brute_chain(m: np.ndarray) -> dict[str, float]:
    n = len(m)
    pairs = [(i, j) for i in range(n) for j in range(n) if i > j]
    return {
        "AC": sum(m[i][j] > m[j][j] for i, j in pairs) / len(pairs),
        "AM": sum(m[i][j] for i, j in pairs) / len(pairs),
        "BC": sum(m[n - 1][j] - m[j][j] for j in range(n - 1)) / (n - 1),
        "FC": sum(m[t][t - 1] - m[t][t] for t in range(1, n)) / (n - 1),
    }


@pytest.mark.parametrize("seed", range(5))
def test_chain_metrics_match_definitions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 2 + seed
    m = np.round(rng.random((n, n)), 1)  # rounding creates ties for the strict AC
    got = chain_metrics(m)
    want = brute_chain(m)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    with_diag = chain_metrics(m, am_include_diagonal=True)["AM"]
    assert with_diag == pytest.approx(np.mean([m[i][j] for i in range(n) for j in range(i + 1)]))


def test_chain_metrics_hand_example_and_single_model() -> None:
    m = np.array([[0.5, 0.0, 0.0], [0.5, 0.7, 0.0], [0.6, 0.65, 0.8]])
    got = chain_metrics(m)
    assert got["AC"] == pytest.approx(1 / 3)  # only M[2][0] > M[0][0]; M[1][0] ties
    assert got["AM"] == pytest.approx((0.5 + 0.6 + 0.65) / 3)
    assert got["BC"] == pytest.approx(((0.6 - 0.5) + (0.65 - 0.7)) / 2)
    assert got["FC"] == pytest.approx(((0.5 - 0.7) + (0.65 - 0.8)) / 2)
    one = chain_metrics(np.array([[0.3]]))
    assert math.isnan(one["AC"]) and math.isnan(one["AM"]) and math.isnan(one["FC"])
    with pytest.raises(DataError, match="square"):
        chain_metrics(np.zeros((2, 3)))


def backfill_data(seed: int = 0, d: int = 8):
    rng = np.random.default_rng(seed)
    n_id = 12
    centers = rng.normal(size=(n_id + 3, d))
    gid = np.repeat(np.arange(n_id), 5)
    qid = rng.integers(0, n_id + 3, 40)
    g_new = centers[gid] + 0.8 * rng.normal(size=(len(gid), d))
    q_new = centers[qid] + 0.8 * rng.normal(size=(40, d))
    g_old = g_new + rng.normal(size=g_new.shape) * rng.uniform(0.2, 3.0, size=(len(gid), 1))
    return q_new, g_old, g_new, gid, qid


def brute_curve(q_new, g_old, g_new, gid, qid, metric, fractions, by, how="distance"):
    """Definition with the 'distance' order (largest 1 - cos(old, new) first) or the 'benefit' order
    (smallest raw old norm first), recomputed with loops and sklearn."""
    if how == "distance":
        key = [-(1 - float(a @ b)) for a, b in zip(unit(g_old), unit(g_new), strict=True)]
    else:
        key = [float(np.sqrt(sum(float(v) ** 2 for v in row))) for row in g_old]
    if by == "class":
        classes = sorted(set(gid.tolist()))
        unit_key = {c: np.mean([key[i] for i in range(len(gid)) if gid[i] == c]) for c in classes}
        order = sorted(classes, key=lambda c: unit_key[c])
    else:
        order = sorted(range(len(gid)), key=lambda i: key[i])
    values = []
    for p in fractions:
        chosen = set(order[: int(round(p * len(order)))])
        picked = [(gid[i] in chosen) if by == "class" else (i in chosen) for i in range(len(gid))]
        gallery = np.where(np.array(picked)[:, None], unit(g_new), unit(g_old))
        scores = unit(q_new) @ gallery.T
        vals = []
        for i in range(len(qid)):
            rel = gid == qid[i]
            if not rel.any():
                continue
            if metric == "top1":
                vals.append(float(gid[int(np.argmax(scores[i]))] == qid[i]))
            else:
                vals.append(average_precision_score(rel, scores[i]))
        values.append(np.mean(vals))
    return np.array(values)


@pytest.mark.parametrize("how", ["distance", "benefit"])
@pytest.mark.parametrize("metric", ["top1", "map"])
@pytest.mark.parametrize("by", ["class", "item"])
def test_backfill_ordered_curves_match_brute_force(metric: str, by: str, how: str) -> None:
    q_new, g_old, g_new, gid, qid = backfill_data(1)
    fractions = np.linspace(0, 1, 11)
    fr, vals, area = partial_backfill_curve(
        q_new, g_old, g_new, gid, qid, metric=metric, by=by, order=how, block_queries=9
    )
    want = brute_curve(q_new, g_old, g_new, gid, qid, metric, fractions, by, how)
    np.testing.assert_allclose(fr, fractions)
    np.testing.assert_allclose(vals, want, atol=1e-9)
    trap = sum((fr[i + 1] - fr[i]) * (vals[i + 1] + vals[i]) / 2 for i in range(len(fr) - 1))
    assert area == pytest.approx(trap)


def test_backfill_random_endpoints_and_seed() -> None:
    q_new, g_old, g_new, gid, qid = backfill_data(2)
    fr, vals, _ = partial_backfill_curve(q_new, g_old, g_new, gid, qid, order="random", seed=3)
    assert vals[0] == pytest.approx(cmc(q_new, qid, g_old, gid, ks=(1,))[1])  # cross test
    assert vals[-1] == pytest.approx(cmc(q_new, qid, g_new, gid, ks=(1,))[1])  # self test
    again = partial_backfill_curve(q_new, g_old, g_new, gid, qid, order="random", seed=3)[1]
    assert np.array_equal(vals, again)


def test_backfill_query_cross_for_different_dims() -> None:
    q_new, g_old, g_new, gid, qid = backfill_data(3)
    g_old_small = g_old[:, :4]  # old model with d_o = 4 < d_n = 8
    _, vals, _ = partial_backfill_curve(
        q_new, g_old_small, g_new, gid, qid, query_cross=q_new[:, :4], fractions=[0.0, 1.0]
    )
    assert vals[0] == pytest.approx(cmc(q_new[:, :4], qid, g_old_small, gid, ks=(1,))[1])
    with pytest.raises(DataError, match="query_cross"):
        partial_backfill_curve(q_new, g_old_small, g_new, gid, qid)


def test_backfill_errors() -> None:
    q_new, g_old, g_new, gid, qid = backfill_data(4)
    with pytest.raises(DataError, match="same items"):
        partial_backfill_curve(q_new, g_old[:-1], g_new, gid, qid)
    with pytest.raises(DataError, match="metric"):
        partial_backfill_curve(q_new, g_old, g_new, gid, qid, metric="top5")
    with pytest.raises(DataError, match="order"):
        partial_backfill_curve(q_new, g_old, g_new, gid, qid, order="oldest")
    with pytest.raises(DataError, match="fractions"):
        partial_backfill_curve(q_new, g_old, g_new, gid, qid, fractions=[0.5, 1.5])
    with pytest.raises(DataError, match="empty"):
        partial_backfill_curve(q_new, g_old[:0], g_new[:0], gid[:0], qid)
