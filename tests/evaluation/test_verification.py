"""TAR@FAR, ROC and AUC against sklearn and brute-force threshold scans."""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from bctkit.errors import DataError
from bctkit.evaluation.verification import roc_auc, roc_curve, tar_at_far

FARS = [1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.5]


@functools.cache
def meant(rate: float) -> Fraction:
    """The simplest fraction that rounds to the float ``rate``, by search over denominators."""
    for q in itertools.count(1):
        p = round(rate * q)
        if float(Fraction(p, q)) == rate:
            return Fraction(p, q)
    raise AssertionError("unreachable")


def allowed_impostors(far: float, n_imp: int) -> int:
    """floor(f N_imp) in exact arithmetic on the rate meant: 0.57 * 100 = 57, (1 / 7) * 7 = 1."""
    return math.floor(meant(far) * n_imp)


def brute_exact(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """Definition scan: smallest score t with #(imp > t) <= floor(f N_imp); TAR = #(gen > t)/N_gen."""
    gen = scores[labels == 1]
    imp = scores[labels == 0]
    allowed = allowed_impostors(far, imp.size)
    if allowed < 1:
        return math.nan
    for t in np.unique(scores):  # ascending: the first hit is the smallest such score
        if np.count_nonzero(imp > t) <= allowed:
            return np.count_nonzero(gen > t) / gen.size
    raise AssertionError("unreachable: the largest score always satisfies the rule")


def sklearn_exact(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """Same rule read off sklearn's full ROC: best TPR among points with fps <= floor(f N_imp)."""
    fpr, tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    n_imp = int(np.sum(labels == 0))
    allowed = allowed_impostors(far, n_imp)
    if allowed < 1:
        return math.nan
    fps = np.rint(fpr * n_imp)
    return float(tpr[fps <= allowed].max())


def same(a: float, b: float) -> bool:
    """Exact equality where NaN equals NaN."""
    return (math.isnan(a) and math.isnan(b)) or a == b


def sklearn_insightface(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """insightface's ijb rule: sklearn ROC, both arrays reversed, then the first nearest-FPR point."""
    fpr, tpr, _ = sk_roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)  # select largest tpr at same fpr
    return float(tpr[np.argmin(np.abs(fpr - far))])


def make_scores(seed: int, n: int = 4000, decimals: int | None = 2, gen_frac: float = 0.2):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < gen_frac).astype(np.int64)
    scores = rng.normal(size=n) + 1.5 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores, labels


@pytest.mark.filterwarnings("ignore:FAR .* not measurable")
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_exact_matches_brute_force_and_sklearn(seed: int, decimals: int | None) -> None:
    scores, labels = make_scores(seed, decimals=decimals)
    got = tar_at_far(scores, labels, FARS)
    assert list(got) == FARS
    assert math.isnan(got[1e-4])  # about 3200 impostors: FAR 1e-4 is below resolution
    for far in FARS:
        assert same(got[far], brute_exact(scores, labels, far))
        assert same(got[far], sklearn_exact(scores, labels, far))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_insightface_matches_sklearn(seed: int, decimals: int | None) -> None:
    scores, labels = make_scores(seed, decimals=decimals)
    got = tar_at_far(scores, labels, FARS, mode="insightface")
    for far in FARS:
        assert got[far] == sklearn_insightface(scores, labels, far)


def scores_of(genuine: list[float], impostor: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(genuine + impostor), np.r_[np.ones(len(genuine), int), np.zeros(len(impostor), int)]


@pytest.mark.parametrize(
    ("genuine", "impostor", "far", "want"),
    [
        # ROC (0,0) (.5,0) (.5,1) (1,1): two points share FPR 0.5, the higher TPR is taken
        ([0.8, 0.7, 0.2], [0.9, 0.1], 0.5, 1.0),
        ([0.8, 0.7, 0.2], [0.9, 0.1], 0.4, 1.0),
        # ROC (0,0) (0,1/3) (.25,1/3) (.25,2/3) (.75,2/3) (.75,1) (1,1)
        ([0.95, 0.7, 0.3], [0.9, 0.5, 0.5, 0.1], 0.25, 2 / 3),
        ([0.95, 0.7, 0.3], [0.9, 0.5, 0.5, 0.1], 0.75, 1.0),
        # 0.5 is exactly halfway between FPR 0.25 and 0.75: the larger FPR wins, then the higher TPR
        ([0.95, 0.7, 0.3], [0.9, 0.5, 0.5, 0.1], 0.5, 1.0),
    ],
)
def test_insightface_adversarial_ties(
    genuine: list[float], impostor: list[float], far: float, want: float
) -> None:
    scores, labels = scores_of(genuine, impostor)
    assert sklearn_insightface(scores, labels, far) == want  # the reference states the rule
    assert tar_at_far(scores, labels, [far], mode="insightface")[far] == want


@pytest.mark.parametrize("seed", range(4))
def test_insightface_at_exact_roc_midpoints(seed: int) -> None:
    # 1024 impostors: every FPR is k/1024 and every midpoint of two FPRs is exactly halfway
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(300, int), np.zeros(1024, int)]
    scores = np.round(rng.normal(size=labels.size) + 1.2 * labels, 1)
    fpr = np.unique(sk_roc_curve(labels, scores)[0])
    targets = [float(x) for x in (fpr[1:] + fpr[:-1]) / 2] + [float(x) for x in fpr[1:]]
    got = tar_at_far(scores, labels, targets, mode="insightface")
    for far in targets:
        assert got[far] == sklearn_insightface(scores, labels, far)


@pytest.mark.parametrize(("far", "n_imp"), [(0.57, 100), (0.29, 100), (0.58, 100), (0.7, 90), (0.009, 3000)])
def test_exact_floor_of_far_times_impostors(far: float, n_imp: int) -> None:
    # float far * n_imp lands just below the integer (0.57 * 100 = 56.99999...); the rule is exact
    assert math.floor(far * n_imp) != allowed_impostors(far, n_imp)
    allowed = allowed_impostors(far, n_imp)
    impostor = [float(v) for v in range(n_imp)]
    threshold = float(n_imp - 1 - allowed)  # #(impostor > t) == allowed
    scores, labels = scores_of([threshold + 0.5, threshold - 0.5], impostor)
    assert brute_exact(scores, labels, far) == 0.5
    assert tar_at_far(scores, labels, [far])[far] == 0.5


@pytest.mark.parametrize("n_imp", [3, 49, 812, 997])
def test_exact_far_k_over_n_imp_allows_k(n_imp: int) -> None:
    # a rate computed as k / N_imp allows exactly k impostors: in floating point (1 / 49) * 49 is
    # 0.9999999999999999, and the shortest decimal of 1 / 3 times 3 is also below 1
    impostor = [float(v) for v in range(n_imp)]
    for k in sorted({1, 2, n_imp // 2, n_imp - 1}):
        far = k / n_imp
        assert allowed_impostors(far, n_imp) == k
        threshold = float(n_imp - 1 - k)
        scores, labels = scores_of([threshold + 0.5, threshold - 0.5], impostor)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert tar_at_far(scores, labels, [far])[far] == 0.5


@pytest.mark.parametrize("mode", ["exact", "insightface"])
@pytest.mark.parametrize("far", [0.0, -0.1, 1.5, 1.0000001, math.nan, math.inf, -math.inf])
def test_far_outside_unit_interval_raises(mode: str, far: float) -> None:
    scores, labels = make_scores(0, n=500)
    with pytest.raises(DataError, match=r"outside \(0, 1\]") as err:
        tar_at_far(scores, labels, [0.1, far], mode=mode)
    assert str(far) in str(err.value) and "\n" not in str(err.value)
    assert tar_at_far(scores, labels, [1.0], mode=mode)[1.0] == 1.0


def test_exact_never_exceeds_far_with_ties() -> None:
    rng = np.random.default_rng(7)
    labels = np.r_[np.ones(50, int), np.zeros(1000, int)]
    scores = rng.integers(0, 5, size=labels.size).astype(float)  # massive ties
    for far in [0.01, 0.1, 0.3]:
        tar = tar_at_far(scores, labels, [far])[far]
        # the threshold reached: smallest t with FAR <= f; recompute and check the achieved FAR
        imp = scores[labels == 0]
        ts = [t for t in np.unique(scores) if np.mean(imp > t) <= far]
        assert np.mean(imp > min(ts)) <= far
        assert tar == np.mean(scores[labels == 1] > min(ts))


@pytest.mark.filterwarnings("ignore:FAR .* not measurable")
def test_one_genuine_pair() -> None:
    scores, labels = make_scores(3, n=3000)
    labels[:] = 0
    labels[17] = 1
    for mode, ref in (("exact", brute_exact), ("insightface", sklearn_insightface)):
        got = tar_at_far(scores, labels, FARS, mode=mode)
        for far in FARS:
            assert same(got[far], ref(scores, labels, far))
            assert math.isnan(got[far]) or got[far] in (0.0, 1.0)


def test_all_equal_scores() -> None:
    scores = np.full(500, 0.25)
    labels = np.r_[np.ones(100, int), np.zeros(400, int)]
    exact = tar_at_far(scores, labels, [0.01, 0.1])
    assert exact == {0.01: 0.0, 0.1: 0.0}  # nothing is strictly above the only score
    insight = tar_at_far(scores, labels, [0.01, 0.6], mode="insightface")
    assert insight[0.01] == sklearn_insightface(scores, labels, 0.01) == 0.0
    assert insight[0.6] == sklearn_insightface(scores, labels, 0.6) == 1.0
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores)) == 0.5


def test_far_below_resolution_is_nan_with_warning() -> None:
    scores, labels = make_scores(1, n=1000)
    n_imp = int(np.sum(labels == 0))
    tiny = 0.5 / n_imp
    with pytest.warns(UserWarning, match="not measurable"):
        got = tar_at_far(scores, labels, [tiny, 0.1])
    assert math.isnan(got[tiny])
    assert not math.isnan(got[0.1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tar_at_far(scores, labels, [1.0 / n_imp])  # exactly one allowed impostor: measurable


@pytest.mark.filterwarnings("ignore:FAR .* not measurable")
def test_float32_bool_labels_and_far_one() -> None:
    scores, labels = make_scores(4, decimals=None)
    s32 = scores.astype(np.float32)
    got = tar_at_far(s32, labels.astype(bool), FARS + [1.0])
    for far in FARS:
        assert same(got[far], brute_exact(s32.astype(np.float64), labels, far))
    assert got[1.0] == 1.0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("drop", [True, False])
def test_roc_curve_matches_sklearn(seed: int, drop: bool) -> None:
    scores, labels = make_scores(seed, n=2000, decimals=[None, 2, 1, 0][seed])
    fpr, tpr, thr = roc_curve(scores, labels, drop_intermediate=drop)
    sfpr, stpr, sthr = sk_roc_curve(labels, scores, drop_intermediate=drop)
    np.testing.assert_array_equal(fpr, sfpr)
    np.testing.assert_array_equal(tpr, stpr)
    np.testing.assert_array_equal(thr, sthr)


@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_matches_sklearn(seed: int) -> None:
    scores, labels = make_scores(seed, n=3000, decimals=[None, 2, 1, 0][seed])
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_errors() -> None:
    scores, labels = make_scores(0, n=100)
    bad = scores.copy()
    bad[3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        tar_at_far(bad, labels, [0.1])
    bad[3] = np.inf
    with pytest.raises(DataError, match="NaN or Inf"):
        roc_curve(bad, labels)
    with pytest.raises(DataError, match="differ in length"):
        tar_at_far(scores[:-1], labels, [0.1])
    with pytest.raises(DataError, match="no genuine"):
        tar_at_far(scores, np.zeros_like(labels), [0.1])
    with pytest.raises(DataError, match="no impostor"):
        tar_at_far(scores, np.ones_like(labels), [0.1])
    with pytest.raises(DataError):
        tar_at_far(scores, np.ones_like(labels), [0.1], mode="insightface")
    with pytest.raises(DataError, match="labels must be 0"):
        tar_at_far(scores, labels * 2, [0.1])
    with pytest.raises(DataError, match="unknown tar_at_far mode"):
        tar_at_far(scores, labels, [0.1], mode="interp")
    with pytest.raises(DataError):
        roc_auc(scores, np.zeros_like(labels))
