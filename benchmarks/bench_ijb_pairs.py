"""Benchmark: IJB-C 1:1 scoring of the listed template pairs vs the full template score matrix.

Usage: python benchmarks/bench_ijb_pairs.py [--templates T] [--pairs P] [--dim D] [--seed N] [--gather]
Prints one JSON line. Default: IJB-C's size, 15,658,489 pairs over 23,124 templates at 512-d
(``--templates 8000 --pairs 2000000`` is a quick run). Pairs are drawn uniformly, so every template
is both a first and a second template: the worst case for the listed scorer's row x column grid.

- listed: what IJBProtocol does: :func:`bctkit.evaluation.protocols.ijb.listed_pair_scores` (auto),
  its one-time grouping of the pairs (``plan_pairs``) timed separately and included in the ratio.
- gather (with ``--gather``): :func:`bctkit.evaluation.templates.pair_scores`, two feature rows
  gathered per pair, 64 MiB per side per block.
- matrix: the N x N approach: every template against every template in one float32 matrix product,
  then the listed entries gathered from it.

Each approach runs in its own child process that builds the same seeded data; its time is the
scoring alone and its memory is the peak resident set size (Linux VmHWM, reset through
/proc/self/clear_refs after the data are built) above the resident size at that moment. The listed
scores are checked against the matrix's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bctkit.evaluation.protocols.ijb import listed_pair_scores, plan_pairs


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _data(templates: int, pairs: int, dim: int, seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((templates, dim),
                                                                              dtype=np.float32)), dim=1)
    first = rng.integers(0, templates, pairs, dtype=np.int64)
    second = rng.integers(0, templates, pairs, dtype=np.int64)
    return feats, first, second


def child(phase: str, templates: int, pairs: int, dim: int, seed: int, out: str) -> None:
    """One approach, measured in this process; writes its scores to ``out`` (.npy)."""
    feats, first, second = _data(templates, pairs, dim, seed)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    plan_s = 0.0
    if phase in ("listed", "gather"):
        plan = plan_pairs(first, second)
        plan_s = time.perf_counter() - t0
        scores = listed_pair_scores(feats, feats, plan, method="auto" if phase == "listed" else "gather")
    else:
        full = feats @ feats.T
        scores = full[torch.from_numpy(first), torch.from_numpy(second)].numpy()
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    np.save(out, scores)
    print(json.dumps({"seconds": seconds, "plan_s": plan_s, "peak_mb": (peak - base) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--templates", type=int, default=23_124)
    ap.add_argument("--pairs", type=int, default=15_658_489)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gather", action="store_true", help="also time pair_scores' per-pair gathers")
    ap.add_argument("--phase", choices=["listed", "gather", "matrix"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        child(args.phase, args.templates, args.pairs, args.dim, args.seed, args.out)
        return
    res, scores = {}, {}
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    phases = ("listed", "gather", "matrix") if args.gather else ("listed", "matrix")
    sizes = ["--templates", str(args.templates), "--pairs", str(args.pairs), "--dim", str(args.dim),
             "--seed", str(args.seed)]
    for phase in phases:
        out = tmp / f"bench_ijb_pairs_{os.getpid()}_{phase}.npy"
        cmd = [sys.executable, __file__, "--phase", phase, "--out", str(out), *sizes]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
        scores[phase] = np.load(out).astype(np.float64)
        out.unlink()
    line: dict[str, object] = {"benchmark": "ijb_pairs", "templates": args.templates, "pairs": args.pairs,
                               "dim": args.dim}
    for phase in phases:
        line[f"{phase}_s"] = round(res[phase]["seconds"], 3)
        line[f"{phase}_peak_mb"] = round(res[phase]["peak_mb"], 1)
        if phase != "matrix":
            line[f"{phase}_plan_s"] = round(res[phase]["plan_s"], 3)
            line[f"{phase}_max_abs_diff"] = float(np.abs(scores[phase] - scores["matrix"]).max())
    listed, matrix = res["listed"], res["matrix"]
    line["time_ratio_matrix_over_listed"] = round(matrix["seconds"] / listed["seconds"], 3)
    line["memory_ratio_matrix_over_listed"] = round(matrix["peak_mb"] / max(listed["peak_mb"], 1e-3), 3)
    line["memory_measure"] = "peak RSS above the post-setup RSS (VmHWM after clear_refs), own process"
    line.update({"torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                 "cpus": os.cpu_count()})
    print(json.dumps(line))

if __name__ == "__main__":
    main()
