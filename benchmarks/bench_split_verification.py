"""Benchmark: the split protocol's all-pairs 1:1 verification, N x N matrix vs score tiles.

Usage: python benchmarks/bench_split_verification.py [--sizes 8000 30000] [--naive-max 8000]
Prints one JSON line. Features: d = 128, 20 images per identity (identity centre plus noise, so
genuine scores are high but overlap the impostors), seeded. For each N the new path
(evaluation.allpairs.allpairs_verification: 64 MiB tiles, top-K impostors, integer AUC counts) runs,
and the old path (the full normalised score matrix, its upper triangle through torch.triu_indices,
then verification.tar_at_far, roc_auc and roc_curve) runs where N <= --naive-max (at N = 30,000 the
old path needs the 3.6 GB matrix plus 7.2 GB of pair indices: beyond an 8 GB budget).

Each (path, N) runs in its own fresh process; time is wall-clock of the verification call alone,
memory is the process's peak resident set (VmHWM from /proc/self/status) minus its resident set just
before the call (features already built). TARs must be identical; the AUC difference is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
PER_ID = 20
DIM = 128


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) // PER_ID
    centres = torch.randn(int(labels[-1]) + 1, DIM, generator=g)
    query = centres[labels] + 1.5 * torch.randn(n, DIM, generator=g)
    gallery = centres[labels] + 1.5 * torch.randn(n, DIM, generator=g)
    return query, gallery, labels


def naive(query: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor) -> tuple[dict, float, int]:
    """The split protocol's verification before score tiles: the whole N x N matrix."""
    from bctkit.evaluation.verification import roc_auc, roc_curve, tar_at_far

    qn = torch.nn.functional.normalize(query, dim=1)
    gn = torch.nn.functional.normalize(gallery, dim=1)
    i, j = torch.triu_indices(len(labels), len(labels), offset=1)
    scores = (qn @ gn.T)[i, j].numpy().astype(np.float64)
    genuine = (labels[i] == labels[j]).numpy().astype(np.int64)
    tars = tar_at_far(scores, genuine, FARS)
    auc = roc_auc(scores, genuine)
    fpr, _, _ = roc_curve(scores, genuine)
    return tars, auc, fpr.size


def tiled(query: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor) -> tuple[dict, float, int]:
    from bctkit.evaluation.allpairs import allpairs_verification

    res = allpairs_verification(query, gallery, labels, FARS)
    return res.tar, res.auc, res.fpr.size


def worker(path: str, n: int, seed: int) -> None:
    query, gallery, labels = features(n, seed)
    before = rss_kib("VmRSS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        tars, auc, points = (naive if path == "naive" else tiled)(query, gallery, labels)
        seconds = time.perf_counter() - t0
    peak = rss_kib("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_mib": (peak - before) / 1024, "auc": auc,
                      "roc_points": points, "tar": [None if math.isnan(tars[f]) else tars[f] for f in FARS]}))


def run(path: str, n: int, seed: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", path, "--sizes", str(n), "--seed", str(seed)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8000, 30000])
    ap.add_argument("--naive-max", type=int, default=8000, help="largest N the N x N path is run at")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", choices=["naive", "tiled"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.sizes[0], args.seed)
        return
    result: dict = {"bench": "split_verification", "dim": DIM, "per_identity": PER_ID, "fars": list(FARS),
                    "torch_threads": torch.get_num_threads(),
                    "memory": "peak RSS (VmHWM) minus RSS before the call, own process per run",
                    "machine": platform.processor() or platform.machine(), "sizes": {}}
    for n in args.sizes:
        row: dict = {"pairs": n * (n - 1) // 2, "tiled": run("tiled", n, args.seed)}
        if n <= args.naive_max:
            row["naive"] = run("naive", n, args.seed)
            t, v = row["tiled"], row["naive"]
            row["tar_identical"] = t["tar"] == v["tar"]
            row["auc_abs_diff"] = abs(t["auc"] - v["auc"])
            row["speedup"] = round(v["seconds"] / t["seconds"], 2)
            row["memory_ratio"] = round(v["peak_mib"] / max(t["peak_mib"], 1.0), 1)
        result["sizes"][str(n)] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()
