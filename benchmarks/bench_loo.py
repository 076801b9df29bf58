"""Benchmark: leave-one-out (``--protocol loo``) in bounded memory vs sorting every query's full row.

Usage: python benchmarks/bench_loo.py [--n 50000] [--dim 512] [--classes 1000] [--block 1024]
Prints one JSON line. Data (seeded, the same in both children): ImageNet-val-shaped, ``n`` images of
``classes`` classes (50 each at full size); an image's feature = its class centre + noise, drawn
twice (the query model's and the gallery model's features), so the test is a cross test.

Each method runs in its own child process, so its peak memory (the child's peak RSS, VmHWM, reset
once the data is built, less its RSS then) is its own:

- ``loo``: LeaveOneOutProtocol.evaluate_pair: blockwise.full_ranking with exclude_self, top-1/5 and
  mAP, exact, in (block x 2^24/block) score tiles.
- ``sort``: the plain way to the same numbers: per block of ``--sort-block`` queries, the full rows
  of scores, the query's own item set to -inf (ranked last: ahead of nothing), a stable descending
  torch.sort of each row, then relevance, precision at each hit, top-k.

``ratio`` = sort time / loo time (above 1: the blockwise path is faster); ``agree``: the values are
equal to 1e-9.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from peak_memory import reset_peak, status_mib

NOISE = 2.5  # per coordinate, against unit-variance centres: top-1 about 0.6, mAP about 0.2


def make_data(n: int, d: int, classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, d, generator=gen)
    labels = torch.arange(n) % classes
    q = centres[labels] + NOISE * torch.randn(n, d, generator=gen)
    g = centres[labels] + NOISE * torch.randn(n, d, generator=gen)
    return q, g, labels


def sort_metrics(q: torch.Tensor, g: torch.Tensor, labels: torch.Tensor, block: int) -> dict[str, float]:
    """top-1, top-5 and mAP from a stable sort of every query's full row (own item last)."""
    qn = torch.nn.functional.normalize(q, dim=1)
    gn = torch.nn.functional.normalize(g, dim=1)
    ap, first = [], []
    for s in range(0, q.shape[0], block):
        rows = torch.arange(s, min(s + block, q.shape[0]))
        scores = qn[rows] @ gn.T
        scores[torch.arange(rows.numel()), rows] = -torch.inf
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :-1]  # own item dropped
        del scores
        rel = labels[order] == labels[rows, None]
        keep = rel.any(1)
        rel = rel[keep]
        rank = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
        cum = torch.cumsum(rel, dim=1, dtype=torch.float64)
        ap.append(torch.where(rel, cum / rank, 0.0).sum(1) / cum[:, -1])
        first.append(torch.where(rel, rank, torch.inf).min(1).values)
    f = torch.cat(first)
    return {"top1": float((f <= 1).double().mean()), "top5": float((f <= 5).double().mean()),
            "map": float(torch.cat(ap).mean())}


def worker(args: argparse.Namespace) -> None:
    from bctkit.evaluation.protocols.loo import LeaveOneOutProtocol

    q, g, labels = make_data(args.n, args.dim, args.classes)
    base = reset_peak()
    t0 = time.perf_counter()
    if args.worker == "loo":
        proto = LeaveOneOutProtocol("bench", labels.numpy(), ks=(1, 5), block=args.block)
        out = {r["metric"]: r["value"] for r in proto.evaluate_pair(q, g, "all").records}
    else:
        out = sort_metrics(q, g, labels, args.sort_block)
    out["seconds"] = time.perf_counter() - t0
    out["peak_extra_mib"] = status_mib("VmHWM") - base
    out["data_mib"] = base
    print(json.dumps(out))


def run_child(method: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(args.n), "--dim", str(args.dim),
           "--classes", str(args.classes), "--block", str(args.block), "--sort-block", str(args.sort_block)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=None, help="default n / 50")
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--sort-block", type=int, default=256)
    ap.add_argument("--worker", choices=("loo", "sort"))
    args = ap.parse_args()
    args.classes = args.classes or max(1, args.n // 50)
    if args.worker:
        worker(args)
        return
    load_start = round(os.getloadavg()[0], 2)
    loo = run_child("loo", args)
    ref = run_child("sort", args)
    print(json.dumps({
        "bench": "loo", "n": args.n, "dim": args.dim, "classes": args.classes,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_1min_start_end": [load_start, round(os.getloadavg()[0], 2)],
        "loo": {"block": args.block, **{k: round(v, 6) for k, v in loo.items()}},
        "sort": {"query_block": args.sort_block, **{k: round(v, 6) for k, v in ref.items()}},
        "ratio": round(ref["seconds"] / loo["seconds"], 3),
        "ratio_peak_memory": round(ref["peak_extra_mib"] / max(loo["peak_extra_mib"], 1.0), 3),
        "agree": all(abs(loo[k] - ref[k]) < 1e-9 for k in ("top1", "top5", "map")),
        "full_score_matrix_mib": round(args.n * args.n * 4 / 2**20),
    }))


if __name__ == "__main__":
    main()
