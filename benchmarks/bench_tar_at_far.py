"""Benchmark: exact TAR@FAR on an IJB-C sized score list vs the sklearn roc_curve path.

Usage: python benchmarks/bench_tar_at_far.py [--small] [--seed N]
Prints one JSON line. Full size: 15,658,489 pairs (insightface's IJB-C 1:1 list), 0.5 % genuine,
FARs 1e-6 ... 1e-1. The sklearn path builds sklearn.metrics.roc_curve and reads the same exact rule
off it (best TPR among ROC points with at most floor(f N_imp) impostors strictly above threshold).
Values are checked for identity against a brute-force computation from fully sorted impostors.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
import warnings

import numpy as np

from bctkit.evaluation.verification import tar_at_far

FARS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


def brute_exact(scores: np.ndarray, labels: np.ndarray, fars: list[float]) -> dict[float, float]:
    """Exact rule from the fully sorted impostor list: t = (floor(f N) + 1)-th largest impostor."""
    imp = np.sort(scores[~labels])[::-1]
    gen = scores[labels]
    out = {}
    for f in fars:
        k = math.floor(f * imp.size)
        out[f] = math.nan if k < 1 else float(np.count_nonzero(gen > imp[k]) / gen.size)
    return out


def sklearn_path(scores: np.ndarray, labels: np.ndarray, fars: list[float]) -> dict[float, float]:
    """roc_curve + pick: best TPR among ROC points whose false-positive count is <= floor(f N)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    n_imp = int(np.count_nonzero(~labels))
    fps = np.rint(fpr * n_imp)
    out = {}
    for f in fars:
        k = math.floor(f * n_imp)
        out[f] = math.nan if k < 1 else float(tpr[np.searchsorted(fps, k, side="right") - 1])
    return out


def jsonable(x: float) -> float | None:
    """NaN (FAR below resolution) becomes null so the line is strict JSON."""
    return None if math.isnan(x) else x


def same(a: dict[float, float], b: dict[float, float]) -> bool:
    return all((math.isnan(a[f]) and math.isnan(b[f])) or a[f] == b[f] for f in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="1,000,000 pairs instead of 15.7M")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--genuine-fraction", type=float, default=0.005)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n = 1_000_000 if args.small else 15_658_489
    rng = np.random.default_rng(args.seed)
    labels = rng.random(n) < args.genuine_fraction
    # cosine-like float32 scores, rounded to 1e-4 so that ties are plentiful
    scores = np.clip(rng.normal(0.05, 0.1, n) + labels * rng.normal(0.55, 0.15, n), -1, 1)
    scores = np.round(scores, 4).astype(np.float32)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FAR 1e-6 is below resolution in --small mode
        t0 = time.perf_counter()
        exact = tar_at_far(scores, labels, FARS)
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tar_at_far(scores, labels, FARS)
            warm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        insight = tar_at_far(scores, labels, FARS, mode="insightface")
        t_insight = time.perf_counter() - t0
    t0 = time.perf_counter()
    skl = sklearn_path(scores, labels, FARS)
    t_sklearn = time.perf_counter() - t0
    brute = brute_exact(scores, labels, FARS)
    t_exact = statistics.median(warm)
    print(
        json.dumps(
            {
                "bench": "tar_at_far",
                "pairs": n,
                "genuine": int(labels.sum()),
                "impostors": int((~labels).sum()),
                "dtype": str(scores.dtype),
                "fars": FARS,
                "bctkit_exact_s_median": round(t_exact, 4),
                "bctkit_exact_s_cold": round(cold, 4),
                "sklearn_roc_path_s": round(t_sklearn, 4),
                "speedup_vs_sklearn": round(t_sklearn / t_exact, 1),
                "speedup_goal": 20,
                "bctkit_insightface_s": round(t_insight, 4),
                "exact_identical_to_bruteforce": same(exact, brute),
                "exact_identical_to_sklearn_path": same(exact, skl),
                "tar_exact": {str(f): jsonable(exact[f]) for f in FARS},
                "tar_insightface": {str(f): jsonable(insight[f]) for f in FARS},
                "machine": f"{platform.processor() or platform.machine()}",
            }
        )
    )


if __name__ == "__main__":
    main()
