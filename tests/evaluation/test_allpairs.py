"""All-pairs verification in score tiles against plain-numpy pair loops, the full-matrix implementation
and sklearn; the split protocol's records against the full-matrix metric functions."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from bctkit.errors import DataError
from bctkit.evaluation import allpairs
from bctkit.evaluation.allpairs import allpairs_verification
from bctkit.evaluation.protocols import EvalProtocol
from bctkit.evaluation.retrieval import retrieval_metrics
from bctkit.evaluation.verification import roc_auc, tar_at_far

FARS = (1e-3, 1e-2, 0.05, 0.1, 0.3, 1.0)


def quantised(n: int, ids: int, seed: int, d: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features with 16 entries +-1 per row (norm 4): every cosine is a multiple of 1/16, exact in any
    summation order, and most scores tie. Rows of one identity share most signs."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, ids, n)
    support = rng.permuted(np.tile(np.arange(d), (ids, 1)), axis=1)[:, :16]
    signs = rng.choice([-1.0, 1.0], (ids, 16))
    feats = []
    for _ in range(2):
        x = np.zeros((n, d), np.float32)
        flip = np.where(rng.random((n, 16)) < 0.3, -1.0, 1.0)
        x[np.arange(n)[:, None], support[labels]] = signs[labels] * flip
        feats.append(torch.from_numpy(x))
    return feats[0], feats[1], torch.from_numpy(labels)


def pair_lists(q: torch.Tensor, g: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) scores of the pairs i < j by an explicit loop over pairs."""
    qn = q.numpy().astype(np.float64)
    gn = g.numpy().astype(np.float64)
    qn /= np.linalg.norm(qn, axis=1, keepdims=True)
    gn /= np.linalg.norm(gn, axis=1, keepdims=True)
    gen, imp = [], []
    lab = labels.numpy()
    for i in range(len(lab)):
        for j in range(i + 1, len(lab)):
            (gen if lab[i] == lab[j] else imp).append(float(qn[i] @ gn[j]))
    return np.array(gen), np.array(imp)


def reference(gen: np.ndarray, imp: np.ndarray, fars) -> tuple[dict, Fraction]:
    """Exact TAR (rule stated in the test: the (floor(f N_imp)+1)-th largest impostor, strict
    acceptance) and the Mann-Whitney AUC as a fraction, by counting."""
    desc = np.sort(imp)[::-1]
    tars = {}
    for far in fars:
        k = math.floor(Fraction(far).limit_denominator(10**6) * len(imp))  # the rate meant: 1/760, 0.01
        if k < 1:
            tars[far] = math.nan
        elif k >= len(imp):
            tars[far] = 1.0
        else:
            tars[far] = float(np.sum(gen > desc[k])) / len(gen)
    wins = int(np.sum(gen[:, None] > imp[None, :])) * 2 + int(np.sum(gen[:, None] == imp[None, :]))
    return tars, Fraction(wins, 2 * len(gen) * len(imp))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("block", [1, 2, 7, 64, None, 10_000])
def test_quantised_scores_every_block_size(block: int | None) -> None:
    q, g, labels = quantised(90, 12, seed=3)
    gen, imp = pair_lists(q, g, labels)
    assert len(np.unique(imp)) < 40 and len(imp) > 3000  # heavy ties
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = allpairs_verification(q, g, labels, FARS + (1e-4,), block_rows=block)
    tars, auc = reference(gen, imp, FARS + (1e-4,))
    assert (res.n_genuine, res.n_impostor, res.n_pairs) == (len(gen), len(imp), 90 * 89 // 2)
    assert all(same(res.tar[f], tars[f]) for f in tars), (res.tar, tars)
    assert math.isnan(res.tar[1e-4]) and res.tar[1.0] == 1.0
    assert res.auc == float(auc)
    labels01 = np.r_[np.ones(len(gen)), np.zeros(len(imp))]
    assert res.auc == pytest.approx(roc_auc_score(labels01, np.r_[gen, imp]), abs=1e-15)


def test_equals_full_matrix_implementation_on_random_features() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 40, (400,))
    centres = torch.randn(40, 48)
    q = centres[labels] + torch.randn(400, 48)
    g = centres[labels] + torch.randn(400, 48)
    qn, gn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    i, j = torch.triu_indices(400, 400, offset=1)
    scores = (qn @ gn.T)[i, j].numpy().astype(np.float64)
    genuine = (labels[i] == labels[j]).numpy().astype(np.int64)
    fars = (1e-5, 1e-4, 1e-3, 1e-2, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = tar_at_far(scores, genuine, fars)
        res = allpairs_verification(q, g, labels, fars)
    assert all(same(res.tar[f], full[f]) for f in fars)
    assert res.auc == pytest.approx(roc_auc(scores, genuine), abs=1e-15)
    assert res.auc == pytest.approx(roc_auc_score(genuine, scores), abs=1e-15)


def test_roc_points_lie_on_the_exact_curve() -> None:
    q, g, labels = quantised(70, 9, seed=5)
    gen, imp = pair_lists(q, g, labels)
    res = allpairs_verification(q, g, labels, (0.01,), block_rows=3)
    exact = {(0.0, 0.0)}
    for t in np.unique(np.r_[gen, imp]):
        exact.add((np.sum(imp >= t) / len(imp), np.sum(gen >= t) / len(gen)))
    assert (res.fpr[0], res.tpr[0]) == (0.0, 0.0) and (res.fpr[-1], res.tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(res.fpr) >= 0) and np.all(np.diff(res.tpr) >= 0)
    for point in zip(res.fpr, res.tpr, strict=True):
        assert min(abs(point[0] - a) + abs(point[1] - b) for a, b in exact) < 1e-12, point


def four_squares(m: int) -> tuple[int, int, int, int]:
    """Integers a >= b >= c >= d >= 0 with a^2 + b^2 + c^2 + d^2 = m (Lagrange: always exist)."""
    for a in range(math.isqrt(m), -1, -1):
        for b in range(min(a, math.isqrt(m - a * a)), -1, -1):
            for c in range(min(b, math.isqrt(m - a * a - b * b)), -1, -1):
                d2 = m - a * a - b * b - c * c
                d = math.isqrt(d2)
                if d * d == d2 and d <= c:
                    return a, b, c, d
    raise AssertionError(m)


def fixed_scores(gen_scores: list[float], imp_scores: list[float], denom: int = 16
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features whose pair scores (i < j) are chosen, multiples of 1/denom: identity m has rows 2m
    and 2m + 1, with genuine score gen_scores[m]; the impostor pairs take imp_scores in (i, j) order.
    Query row i = e_i; gallery row j holds the score of pair (i, j) at coordinate i, and four padding
    coordinates (multiples of 1/denom, by Lagrange's four squares) make its norm exactly 1, so
    normalising changes nothing and every score is exact."""
    n = 2 * len(gen_scores)
    assert len(imp_scores) == n * (n - 1) // 2 - len(gen_scores)
    g = torch.zeros(n, n + 4)
    it = iter(imp_scores)
    for i in range(n):
        for j in range(i + 1, n):
            g[j, i] = gen_scores[i // 2] if i // 2 == j // 2 else next(it)
    for j in range(n):
        used = int(round(float((g[j, :n].double() * denom).pow(2).sum())))
        g[j, n:] = torch.tensor(four_squares(denom * denom - used), dtype=torch.float32) / denom
    q = torch.cat([torch.eye(n), torch.zeros(n, 4)], 1)
    return q, g, torch.arange(n) // 2


def test_fixed_scores_are_what_they_say() -> None:
    q, g, labels = fixed_scores([0.5, 0.25], [0.125, 0.0, -0.25, 0.375])
    gen, imp = pair_lists(q, g, labels)
    assert sorted(gen) == [0.25, 0.5] and sorted(imp) == [-0.25, 0.0, 0.125, 0.375]


def test_k_boundaries_and_ties() -> None:
    # 4 identities x 2 images: 28 pairs, 4 genuine, 24 impostor; values small enough for unit rows
    imp = [0.0625 * (k % 6) - 0.125 for k in range(24)]  # each of 6 values 4 times: heavy ties
    gen = [0.1875, 0.125, 0.0625, 0.25]
    q, g, labels = fixed_scores(gen, imp)
    desc = sorted(imp, reverse=True)
    fars = {1 / 25: "f N_imp < 1", 1 / 24: "f N_imp = 1", 0.125: "= 3", 4 / 24: "= 4", 0.5: "= 12",
            23 / 24: "= 23", 1.0: "all"}
    with pytest.warns(UserWarning, match="not measurable"):
        res = allpairs_verification(q, g, labels, list(fars), block_rows=2)
    assert math.isnan(res.tar[1 / 25])
    # k = 1: threshold = 2nd largest impostor = 0.1875 (tied with the largest): TAR = #gen > 0.1875
    assert desc[1] == 0.1875 and res.tar[1 / 24] == 1 / 4
    # k = 3: 4th largest = 0.1875 still (4 ties); k = 4: 5th largest = 0.125
    assert res.tar[0.125] == 1 / 4 and res.tar[4 / 24] == 2 / 4
    # k = 12: 13th largest = 0.0; k = 23: 24th (smallest) = -0.125; f = 1: accept all
    assert res.tar[0.5] == 1.0 and res.tar[23 / 24] == 1.0 and res.tar[1.0] == 1.0
    for far, tar in res.tar.items():
        if far == 1 / 25:
            continue
        k = math.floor(Fraction(far).limit_denominator(1000) * 24)
        t = desc[k] if k < 24 else -math.inf
        assert tar == sum(x > t for x in gen) / 4
        assert sum(x > t for x in imp) <= k  # the achieved FAR never exceeds f
    wins = sum(2 * (a > b) + (a == b) for a in gen for b in imp)
    assert res.auc == float(Fraction(wins, 2 * 4 * 24))


@pytest.mark.parametrize("block", [1, 3, 40])
@pytest.mark.parametrize("fars", [(1 / 760, 2 / 760, 0.01), (1 / 760, 0.05, 0.2, 0.5)])
@pytest.mark.parametrize("increasing", [False, True])
def test_running_top_k_over_many_tiles(block: int, fars: tuple[float, ...], increasing: bool) -> None:
    # 20 identities x 2 images, scores in units of 1/2048 (squares and their sums exact in float32)
    rng = np.random.default_rng(7)
    if increasing:  # in pair order, two per level: each tile lies just above the running top K
        imp_units = np.arange(760) // 2
        gen_units = rng.permutation(np.arange(360, 380))
    else:  # 698 low ones and a tail 0..59 with 55 and 53 doubled; genuine one per level of the tail
        tail = np.r_[np.arange(60), 55, 53]
        imp_units = np.r_[rng.integers(-100, 0, 698), tail][rng.permutation(760)]
        gen_units = rng.permutation(np.arange(45, 65))
    gen, imp = list(gen_units / 2048), list(imp_units / 2048)
    q, g, labels = fixed_scores(gen, imp, denom=2048)
    res = allpairs_verification(q, g, labels, fars, block_rows=block)  # small K: many merges
    tars, auc = reference(np.array(gen), np.array(imp), fars)
    assert all(same(res.tar[f], tars[f]) for f in fars), (res.tar, tars)
    assert res.auc == float(auc)


@pytest.mark.parametrize("pattern", ["increasing", "decreasing", "ties", "ulps"])
@pytest.mark.parametrize("k", [1, 2, 5, 13, 200])
def test_running_top_k_merge(pattern: str, k: int) -> None:
    """The running top K over 40 tiles of 10 impostor scores equals the K largest of them all,
    whatever the order: overlapping increasing runs, decreasing, heavy ties, values 1 ulp apart."""
    rng = np.random.default_rng(k)
    runs = np.arange(40)[:, None] * 3 + np.arange(10)[None, :]  # tile t: t*3 .. t*3+9, overlapping
    if pattern == "increasing":
        tiles = runs / 64
    elif pattern == "decreasing":
        tiles = runs[::-1] / 64
    elif pattern == "ties":
        tiles = rng.integers(0, 6, (40, 10)) / 8
    else:
        base = np.array(0.3, np.float32).view(np.int32)
        tiles = (base + rng.permuted(runs, axis=1)).astype(np.int32).view(np.float32)
    tiles = np.asarray(tiles, np.float32)
    stream = ((torch.empty(0), torch.from_numpy(t.copy())) for t in tiles)
    _, top = allpairs._top_k(stream, k, 0, tiles.size)
    assert np.array_equal(top.numpy(), np.sort(tiles.ravel())[::-1][:k])


def test_top_k_cap_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    q, g, labels = quantised(60, 6, seed=1)
    monkeypatch.setattr(allpairs, "MAX_KEPT", 100)
    with pytest.raises(DataError, match=r"FAR 0.1 over \d+ impostor pairs needs the \d+ largest"):
        allpairs_verification(q, g, labels, (1e-3, 0.1))
    allpairs_verification(q, g, labels, (1e-3, 0.01))  # 14 kept: fine


@pytest.mark.parametrize("case", ["no genuine", "no impostor", "nan", "shape", "far"])
def test_bad_input(case: str) -> None:
    q, g, labels = quantised(20, 3, seed=2)
    fars: tuple[float, ...] = (0.1,)
    if case == "no genuine":
        labels = torch.arange(20)
    elif case == "no impostor":
        labels = torch.zeros(20, dtype=torch.int64)
    elif case == "nan":
        q[3, 0] = math.nan
    elif case == "shape":
        g = g[:-1]
    else:
        fars = (0.0,)
    with pytest.raises(DataError):
        allpairs_verification(q, g, labels, fars)


def test_split_protocol_records_equal_full_computation() -> None:
    torch.manual_seed(3)
    labels = torch.arange(30).repeat_interleave(6)[torch.randperm(180)]
    centres = torch.randn(30, 24)
    q = centres[labels] + 0.9 * torch.randn(180, 24)
    g = centres[labels] + 0.9 * torch.randn(180, 24)
    fars = (1e-4, 1e-3, 1e-2)
    protocol = EvalProtocol("syn", labels, 2, fars, (1,), identification=False)
    records = {r["metric"]: r for r in protocol.evaluate_pair(q, g, "d").records}
    qn, gn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)
    i, j = torch.triu_indices(180, 180, offset=1)
    scores = (qn @ gn.T)[i, j].numpy().astype(np.float64)
    genuine = (labels[i] == labels[j]).numpy().astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tars = tar_at_far(scores, genuine, fars)
    assert not math.isnan(tars[1e-4])
    for far in fars:
        name = f"tar@far={far:.0e}".replace("e-0", "e-")
        assert records[name]["value"] == tars[far] and records[name]["n"] == len(scores)
    assert records["auc"]["value"] == pytest.approx(roc_auc(scores, genuine), abs=1e-15)
    assert f"all {len(scores)} pairs i<j ({int(genuine.sum())} genuine" in records["auc"]["protocol"]
    ret = retrieval_metrics(q, labels, g, labels, ks=(1,), exclude_self=True)
    assert records["map"]["value"] == ret["map"] and records["map@r"]["value"] == ret["map_at_r"]
    assert records["map"]["n"] == 180
