"""Benchmark: revisited Oxford + R1M (``--protocol roxford``) without the score matrix vs the score
matrix and a full argsort.

Usage: python benchmarks/bench_revisited.py [--distractors 1000000] [--dim 2048] [--block-gallery N]
Prints one JSON line. Data (seeded, built block by block, the same in both children): ROxford-shaped,
70 queries, a database of 4,993 images plus ``--distractors``, ``--dim`` features; per query 20-80 easy,
20-100 hard and 20-100 junk database images (a query's easy images = its centre + little noise, hard
and junk = more noise, everything else random). The database is held in **float16** (1M x 2048 is
4 GiB instead of 8): the protocol converts one block at a time, the reference too.

Each method runs in its own child process; its peak memory is the child's peak RSS (VmHWM, reset once the data
is built) less its RSS then (``peak_extra_mib``):

- ``revisited``: RevisitedProtocol.evaluate_pair (setwise.set_ranking: for each listed item the
  negatives ranked ahead of it, walking the database in blocks; Easy / Medium / Hard mAP and mP@k);
- ``matrix``: the plain way: the whole 70 x N float32 score matrix (filled block by block), a stable
  descending torch.sort of each row, then the authors' compute_map per setup (positions of positives
  and junk in the ranking, positives lowered by the junk before them).

``ratio`` = matrix time / revisited time (above 1: revisited faster); ``agree``: every mAP and mP@k
equal to 1e-9; ``score_matrix_mib``: what the reference holds for the scores alone (plus 2x that for
the sort's int64 indices).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from peak_memory import reset_peak, status_mib

N_QUERY, N_DB, CHUNK = 70, 4993, 1 << 16


def make_data(n_distractors: int, d: int) -> tuple[torch.Tensor, list[tuple[np.ndarray, ...]]]:
    """(features [70 + 4993 + N, d] float16: queries, database, distractors; per-query lists)."""
    rng = np.random.default_rng(0)
    n = N_QUERY + N_DB + n_distractors
    feats = torch.empty((n, d), dtype=torch.float16)
    for s in range(0, n, CHUNK):  # random rows, block by block: never an n x d float32 array
        gen = torch.Generator().manual_seed(s)
        feats[s : s + CHUNK] = torch.randn(min(CHUNK, n - s), d, generator=gen).half()
    lists = []
    gen = torch.Generator().manual_seed(n + 1)
    centres = torch.randn(N_QUERY, d, generator=gen)
    for i in range(N_QUERY):
        perm = rng.permutation(N_DB)
        a, b, c = int(rng.integers(20, 81)), int(rng.integers(20, 101)), int(rng.integers(20, 101))
        easy, hard, junk = perm[:a], perm[a : a + b], perm[a + b : a + b + c]
        feats[i] = (centres[i] + 0.8 * torch.randn(d, generator=gen)).half()
        for idx, noise in ((easy, 1.0), (hard, 2.5), (junk, 2.5)):
            rows = torch.as_tensor(idx + N_QUERY)
            feats[rows] = (centres[i] + noise * torch.randn(len(idx), d, generator=gen)).half()
        lists.append((easy, hard, junk))
    return feats, lists


def authors_map(ranks: np.ndarray, ok: list[np.ndarray], junk: list[np.ndarray], ks=(1, 5, 10)
                ) -> tuple[float, list[float]]:
    """The authors' compute_map over ``ranks`` [nq, N] (each row the database in rank order)."""
    aps, prs = [], []
    for i in range(ranks.shape[0]):
        if ok[i].size == 0:
            continue
        pos = np.flatnonzero(np.isin(ranks[i], ok[i]))
        jpos = np.flatnonzero(np.isin(ranks[i], junk[i]))
        pos = pos - np.searchsorted(jpos, pos, side="left")  # junk strictly before each positive
        j = np.arange(pos.size)
        p0 = np.divide(j, pos, out=np.ones(pos.size), where=pos > 0)
        aps.append(float(np.sum((p0 + (j + 1) / (pos + 1)) / 2) / ok[i].size))
        p1 = pos + 1
        prs.append([float((p1 <= min(p1.max(), k)).sum() / min(p1.max(), k)) for k in ks])
    return float(np.mean(aps)), np.mean(prs, 0).tolist()


def matrix_metrics(feats: torch.Tensor, lists: list[tuple[np.ndarray, ...]]) -> dict[str, float]:
    q = torch.nn.functional.normalize(feats[:N_QUERY].float(), dim=1)
    n_gallery = feats.shape[0] - N_QUERY
    scores = torch.empty((N_QUERY, n_gallery), dtype=torch.float32)
    for s in range(0, n_gallery, CHUNK):
        g = torch.nn.functional.normalize(feats[N_QUERY + s : N_QUERY + s + CHUNK].float(), dim=1)
        scores[:, s : s + g.shape[0]] = q @ g.T
    ranks = torch.sort(scores, dim=1, descending=True, stable=True).indices.numpy()
    del scores
    out: dict[str, float] = {}
    for setup in ("easy", "medium", "hard"):
        ok, junk = [], []
        for e, h, j in lists:
            o, jk = {"easy": (e, np.concatenate([j, h])), "medium": (np.concatenate([e, h]), j),
                     "hard": (h, np.concatenate([j, e]))}[setup]
            ok.append(o)
            junk.append(jk)
        m, mp = authors_map(ranks, ok, junk)
        out[f"map_{setup}"] = m
        out.update({f"mp@{k}_{setup}": v for k, v in zip((1, 5, 10), mp, strict=True)})
    return out


def worker(args: argparse.Namespace) -> None:
    from bctkit.evaluation.protocols.revisited import RevisitedProtocol

    feats, lists = make_data(args.distractors, args.dim)
    base = reset_peak()
    t0 = time.perf_counter()
    if args.worker == "revisited":
        easy, hard, junk = (tuple(x[k] for x in lists) for k in range(3))
        proto = RevisitedProtocol("bench", easy, hard, junk, N_DB, args.distractors)
        out = {r["metric"]: r["value"] for r in proto.evaluate_pair(feats, feats, "all").records}
    else:
        out = matrix_metrics(feats, lists)
    out["seconds"] = time.perf_counter() - t0
    out["peak_extra_mib"] = status_mib("VmHWM") - base
    out["data_mib"] = base
    print(json.dumps(out))


def run_child(method: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", method, "--distractors", str(args.distractors),
           "--dim", str(args.dim)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--distractors", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--worker", choices=("revisited", "matrix"))
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    load_start = round(os.getloadavg()[0], 2)
    ours = run_child("revisited", args)
    ref = run_child("matrix", args)
    metrics = [k for k in ours if k.startswith(("map_", "mp@"))]
    n_gallery = N_DB + args.distractors
    print(json.dumps({
        "bench": "revisited", "queries": N_QUERY, "database": N_DB, "distractors": args.distractors,
        "dim": args.dim, "storage": "float16", "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_start_end": [load_start, round(os.getloadavg()[0], 2)],
        "revisited": {k: round(v, 6) for k, v in ours.items()},
        "matrix": {k: round(v, 6) for k, v in ref.items()},
        "ratio": round(ref["seconds"] / ours["seconds"], 3),
        "ratio_peak_memory": round(ref["peak_extra_mib"] / max(ours["peak_extra_mib"], 1.0), 3),
        "agree": all(abs(ours[k] - ref[k]) < 1e-9 for k in metrics),
        "score_matrix_mib": round(N_QUERY * n_gallery * 4 / 2**20),
    }))


if __name__ == "__main__":
    main()
