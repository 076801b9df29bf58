"""Benchmark: insightface 10-fold verification accuracy on an LFW-sized pair list, bctkit's counting
(one sort per fold, integer counts for all thresholds) vs the per-threshold loop (one numpy pass over
the training pairs for each of the 400 thresholds of each fold).

Usage: python benchmarks/bench_pairs.py [--pairs N] [--seed N] [--repeats N]
Prints one JSON line. Default size: 6,000 pairs (LFW), half genuine; distances rounded to 1e-3 so
that pairs sit exactly on thresholds. The per-fold accuracies of both paths must be identical.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from bctkit.evaluation.protocols.pairs import fold_slices, insightface_thresholds, kfold_accuracy

T = TypeVar("T")


def per_threshold_loop(dist: np.ndarray, issame: np.ndarray, folds: int) -> np.ndarray:
    """Per fold: the training accuracy of every threshold, one numpy pass each; first best wins."""
    thresholds = insightface_thresholds()
    parts = fold_slices(dist.size, folds)
    acc = np.zeros(folds)
    for f, part in enumerate(parts):
        test = np.zeros(dist.size, dtype=bool)
        test[part] = True
        d_train, s_train = dist[~test], issame[~test]
        train_acc = np.array([np.mean((d_train < t) == s_train) for t in thresholds])
        best = thresholds[int(np.argmax(train_acc))]
        acc[f] = np.count_nonzero((dist[test] < best) == issame[test]) / np.count_nonzero(test)
    return acc


def timed(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """Median wall time of ``repeats`` calls and the last result."""
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    issame = rng.random(args.pairs) < 0.5
    dist = np.where(issame, rng.normal(0.9, 0.35, args.pairs), rng.normal(1.9, 0.3, args.pairs))
    dist = np.round(np.clip(dist, 0.0, 4.0), 3)

    ours_s, (ours, _) = timed(lambda: kfold_accuracy(dist, issame, 10), args.repeats)
    loop_s, loop = timed(lambda: per_threshold_loop(dist, issame, 10), args.repeats)
    print(json.dumps({
        "benchmark": "pairs_kfold_accuracy", "pairs": args.pairs, "folds": 10,
        "thresholds": int(insightface_thresholds().size), "repeats": args.repeats,
        "bctkit_s": round(ours_s, 6), "per_threshold_loop_s": round(loop_s, 6),
        "ratio": round(loop_s / ours_s, 1), "identical": bool(np.array_equal(ours, loop)),
        "acc10fold": float(np.mean(ours)), "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
