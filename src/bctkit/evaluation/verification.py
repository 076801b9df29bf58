"""1:1 verification metrics (evaluation.md, "1:1 verification: TAR@FAR").

Two TAR@FAR definitions are offered, and the one used must be named in every report:

- ``exact`` (default): threshold t = the smallest score with #(impostor > t) <= floor(f N_imp),
  i.e. the (floor(f N_imp) + 1)-th largest impostor score; TAR = #(genuine > t) / N_gen. Ties never
  let the FAR exceed f. When f N_imp < 1 the FAR cannot be measured: the value is NaN and a warning
  is issued.
- ``insightface``: ROC as sklearn's ``roc_curve(drop_intermediate=True)`` builds it; TAR is the TPR
  of the ROC point whose FPR is nearest to f (no interpolation; that FPR may exceed f). insightface
  scans the ROC from its end, so among points sharing that FPR the highest TPR wins, and of two
  points equally near f the one with the larger FPR.

f must lie in (0, 1] (DataError otherwise). floor(f N_imp) is computed in exact rational arithmetic
on the simplest fraction that rounds to the given float: 57/100 for 0.57 (100 impostors allow 57,
where 0.57 * 100 in floating point gives 56.99...), 1/812 for 1 / 812 (812 impostors allow one).

Everything is plain numpy: sklearn is only used by the tests, as the independent reference.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from bctkit.errors import DataError

TAR_MODES = ("exact", "insightface")
TAR_RULES = {
    "exact": "exact TAR@FAR",
    "insightface": "insightface TAR@FAR (TPR of the ROC point whose FPR is nearest the FAR; that FPR may "
                   "exceed it)",
}
"""How each mode is named in a record's description."""


def check_tar_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`TAR_MODES`, else a DataError naming them."""
    if mode not in TAR_MODES:
        raise DataError(f"unknown tar_at_far mode {mode!r}; expected one of {', '.join(TAR_MODES)}")
    return mode


def insightface_tar(fpr: np.ndarray, tpr: np.ndarray, fars: Sequence[float]) -> dict[float, float]:
    """insightface's TAR per FAR from a ROC built as ``roc_curve(drop_intermediate=True)`` builds it:
    the TPR of the LAST point whose FPR is nearest to the FAR (insightface reverses the arrays before
    its argmin)."""
    last = len(fpr) - 1
    return {far: float(tpr[last - int(np.argmin(np.abs(fpr - far)[::-1]))]) for far in fars}


def _check_scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten; return float32/64 scores and a boolean genuine mask."""
    s = np.asarray(scores)
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float64)
    s = s.ravel()
    lab = np.asarray(labels).ravel()
    if s.shape[0] != lab.shape[0]:
        raise DataError(f"scores ({s.shape[0]}) and labels ({lab.shape[0]}) differ in length")
    if s.shape[0] == 0:
        raise DataError("scores is empty; expected at least one genuine and one impostor score")
    if not np.isfinite(s).all():
        raise DataError("scores contain NaN or Inf; expected finite similarity scores")
    if lab.dtype == np.bool_:
        gen = lab
    else:
        gen = lab == 1
        if not (gen | (lab == 0)).all():
            raise DataError("labels must be 0 (impostor) or 1 (genuine)")
    return s, gen


def _split(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (genuine, impostor) score arrays, raising DataError when either is empty."""
    s, gen = _check_scores_labels(scores, labels)
    genuine = s[gen]
    impostor = s[~gen]
    if genuine.size == 0:
        raise DataError("labels contain no genuine pair (label 1); TAR is undefined")
    if impostor.size == 0:
        raise DataError("labels contain no impostor pair (label 0); FAR is undefined")
    return genuine, impostor


def check_rate(rate: float, name: str) -> None:
    """Raise DataError unless ``rate`` (a FAR or FPIR) lies in (0, 1]."""
    try:
        inside = bool(0 < rate <= 1)
    except TypeError:
        inside = False
    if not inside:
        raise DataError(f"{name} {rate!r} is outside (0, 1]; expected a rate with 0 < {name} <= 1")


def _simplest_in(lo: Fraction, hi: Fraction) -> Fraction:
    """The fraction with the smallest denominator in [lo, hi], 0 <= lo <= hi (continued fractions)."""
    whole = math.floor(lo)
    if whole == lo:
        return Fraction(whole)
    if whole + 1 <= hi:
        return Fraction(whole + 1)
    return whole + 1 / _simplest_in(1 / (hi - whole), 1 / (lo - whole))


def rate_fraction(rate: float) -> Fraction:
    """The simplest fraction that rounds to ``rate``: the rate the caller meant, exactly.

    A typed decimal comes back as itself (0.57 -> 57/100) and a computed ratio as the ratio
    (1 / 812 -> 1/812); the float's own binary value (0.5699999...) or its shortest decimal
    (0.0012315270935960591 for 1/812, slightly below it) would each lose one count on some inputs.
    """
    if not isinstance(rate, (float, np.floating)):
        return Fraction(rate)  # int, Fraction, Decimal: already exact
    if isinstance(rate, np.floating) and not isinstance(rate, float):
        x = np.asarray(rate)
        down, up = np.nextafter(x, x.dtype.type(0)), np.nextafter(x, x.dtype.type(np.inf))
        value, below, above = Fraction(float(x)), Fraction(float(down)), Fraction(float(up))
    else:
        value = Fraction(rate)
        below, above = Fraction(math.nextafter(rate, 0.0)), Fraction(math.nextafter(rate, math.inf))
    return _simplest_in((value + below) / 2, (value + above) / 2)


def floor_rate_count(rate: float, n: int) -> int:
    """floor(rate * n), exactly: floating point makes 0.57 * 100 = 56.99999... and allows one too few."""
    return math.floor(rate_fraction(rate) * n)


def exact_thresholds(impostor: np.ndarray, fars: Sequence[float]) -> dict[float, float]:
    """Exact-rule threshold per FAR: the (floor(f N_imp) + 1)-th largest impostor score.

    NaN (with a warning) where f N_imp < 1; -inf where floor(f N_imp) >= N_imp (accept everything).
    DataError for a FAR outside (0, 1]. One np.partition isolates the top impostors, then only that
    tail is sorted.
    """
    imp = np.asarray(impostor).ravel()
    n = imp.size
    ks = {}
    for far in fars:
        check_rate(far, "FAR")
        ks[far] = floor_rate_count(far, n)
    needed = [k for k in ks.values() if 1 <= k < n]
    tail = np.empty(0, dtype=imp.dtype)
    if needed:
        kmax = max(needed)
        # Largest kmax + 1 impostors, in descending order: tail[k] is the (k+1)-th largest.
        tail = np.sort(np.partition(imp, n - 1 - kmax)[n - 1 - kmax :])[::-1]
    return thresholds_from_top(tail, n, ks, stacklevel=4)


def thresholds_from_top(top: Sequence[float] | np.ndarray, n_imp: int, counts: dict[float, int],
                        stacklevel: int = 3) -> dict[float, float]:
    """The exact rule's threshold per FAR from the largest impostor scores in descending order
    (``top[k]`` is the (k+1)-th largest; it must reach past every count below ``n_imp``) and
    ``counts`` {far: floor(f N_imp)}: NaN with a warning where the count is 0, -inf where it is
    ``n_imp`` or more (accept everything)."""
    out: dict[float, float] = {}
    for far, k in counts.items():
        if k < 1:
            warnings.warn(f"FAR {far:g} is not measurable with {n_imp} impostor scores (f*N_imp < 1): NaN",
                          stacklevel=stacklevel)
            out[far] = math.nan
        elif k >= n_imp:
            out[far] = -math.inf
        else:
            out[far] = float(top[k])
    return out


def roc_curve(
    scores: np.ndarray, labels: np.ndarray, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC (fpr, tpr, thresholds) with sklearn.metrics.roc_curve semantics (sklearn >= 1.3).

    One point per distinct score (decreasing thresholds, a point accepts scores >= threshold), a
    leading (0, 0) point with threshold +inf, and with ``drop_intermediate`` the collinear points
    (zero second difference of both fps and tps) removed.
    """
    s, gen = _check_scores_labels(scores, labels)
    n_gen = int(gen.sum())
    if n_gen == 0 or n_gen == s.size:
        raise DataError("roc_curve needs at least one genuine (1) and one impostor (0) label")
    # Distinct scores in decreasing order; the point at a score counts everything >= that score.
    s_sorted = np.sort(s)[::-1]
    idx = np.concatenate([np.flatnonzero(np.diff(s_sorted)), [s.size - 1]])
    gen_sorted = np.sort(s[gen])
    tps = n_gen - np.searchsorted(gen_sorted, s_sorted[idx], side="left")
    fps = idx + 1 - tps
    thresholds = s_sorted[idx].astype(np.float64)
    if drop_intermediate and fps.size > 2:
        keep = np.concatenate([[True], np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), [True]])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps = np.concatenate([[0], fps]).astype(np.float64)
    tps = np.concatenate([[0], tps]).astype(np.float64)
    thresholds = np.concatenate([[np.inf], thresholds])
    return fps / fps[-1], tps / tps[-1], thresholds


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the trapezoid rule (ties count one half, as roc_auc_score)."""
    fpr, tpr, _ = roc_curve(scores, labels, drop_intermediate=False)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def tar_at_far(
    scores: np.ndarray, labels: np.ndarray, fars: Sequence[float], mode: str = "exact"
) -> dict[float, float]:
    """TAR at each FAR, keyed by the FAR as given; ``mode`` is "exact" or "insightface".

    exact: t = smallest score with #(impostor > t) <= floor(f N_imp); TAR = #(genuine > t) / N_gen;
    NaN plus a warning when f N_imp < 1. insightface: TPR at the point of the sklearn-style ROC
    (drop_intermediate) whose FPR is nearest to f, the LAST such point (insightface reverses the
    arrays before its argmin): highest TPR at equal FPR, larger FPR at equal distance.
    Every FAR must lie in (0, 1] (DataError otherwise).
    """
    check_tar_mode(mode)
    fars = list(fars)
    for far in fars:
        check_rate(far, "FAR")
    if mode == "insightface":
        fpr, tpr, _ = roc_curve(scores, labels, drop_intermediate=True)
        return insightface_tar(fpr, tpr, fars)
    genuine, impostor = _split(scores, labels)
    thresholds = exact_thresholds(impostor, fars)
    gen_sorted = np.sort(genuine)
    out: dict[float, float] = {}
    for far in fars:
        t = thresholds[far]
        if math.isnan(t):
            out[far] = math.nan
            continue
        n_above = gen_sorted.size - int(np.searchsorted(gen_sorted, t, side="right"))
        out[far] = n_above / gen_sorted.size
    return out
