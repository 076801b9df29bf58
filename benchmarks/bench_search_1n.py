"""Benchmark: 1:N full-ranking metrics in bounded memory vs plain matmul + top-k per query chunk.

Usage: python benchmarks/bench_search_1n.py [--queries 10000] [--gallery 1000000] [--dim 128]
Prints one JSON line. Data: unit features of ``gallery / 10`` identities (10 images each; an image =
its identity's centre + noise), queries drawn from random identities, so the metrics are not trivial.

Each method runs in its own child process (same seeded data), so its peak memory (ru_maxrss of the
child, less the child's peak after building the data) is its own:

- ``blockwise``: bctkit.evaluation.blockwise.full_ranking + summarize: exact mAP, mAP@R and CMC over
  the full ranking, in (block x 2^24/block) score tiles.
- ``naive``: the plain approach, per chunk of ``--naive-chunk`` queries: one (chunk x gallery) score
  matrix by torch.mm, then torch.topk(10): CMC top-1/5/10 only (no mAP: that needs each relevant
  item's rank in the full ranking). The whole 10k x 1M matrix at once would need 40 GB at float32.
- ``sort`` (only when queries x gallery <= ``--sort-max``): the plain way to the same exact mAP
  (:func:`sort_metrics`): every query's full row of scores sorted.

``ratio`` = naive time / blockwise time (above 1: the blockwise path is faster; the naive one computes
less), ``ratio_sort`` = sort time / blockwise time (same metrics); the CMC values and mAPs must agree
(``cmc_agree``, ``map_agree``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_data(n_q: int, n_g: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    n_ids = max(1, n_g // 10)
    centres = torch.randn(n_ids, d, generator=gen)
    gid = torch.arange(n_g) % n_ids
    gallery = centres[gid]
    for s in range(0, n_g, 1 << 16):  # in place, chunked: no second gallery-sized temporary
        gallery[s : s + (1 << 16)] += 1.2 * torch.randn(min(1 << 16, n_g - s), d, generator=gen)
    gallery = torch.nn.functional.normalize(gallery, dim=1, out=gallery)
    qid = torch.randint(0, n_ids, (n_q,), generator=gen)
    queries = torch.nn.functional.normalize(centres[qid] + 1.2 * torch.randn(n_q, d, generator=gen), dim=1)
    return queries, qid, gallery, gid


def naive(queries: torch.Tensor, qid: torch.Tensor, gallery: torch.Tensor, gid: torch.Tensor,
          chunk: int) -> dict[str, float]:
    hits = []
    for s in range(0, queries.shape[0], chunk):
        scores = queries[s : s + chunk] @ gallery.T
        idx = scores.topk(10, dim=1).indices
        del scores
        hits.append(gid[idx] == qid[s : s + chunk, None])
    h = torch.cat(hits)
    return {f"top{k}": float(h[:, :k].any(1).double().mean()) for k in (1, 5, 10)}


def sort_metrics(queries: torch.Tensor, qid: torch.Tensor, gallery: torch.Tensor, gid: torch.Tensor,
                 block: int = 64) -> dict[str, float]:
    """mAP, mAP@R and CMC top-1/5/10 from a stable sort of each query's full row of scores."""
    ap, ap_r, first = [], [], []
    for s in range(0, queries.shape[0], block):
        order = torch.sort(queries[s : s + block] @ gallery.T, dim=1, descending=True, stable=True).indices
        rel = gid[order] == qid[s : s + block, None]
        rel = rel[rel.any(1)]
        rank = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
        cum = torch.cumsum(rel, dim=1, dtype=torch.float64)
        n_rel = cum[:, -1]
        prec = torch.where(rel, cum / rank, 0.0)
        ap.append(prec.sum(1) / n_rel)
        ap_r.append((prec * (rank <= n_rel[:, None])).sum(1) / n_rel)
        first.append(torch.where(rel, rank, torch.inf).min(1).values)
    f = torch.cat(first)
    out = {"map": float(torch.cat(ap).mean()), "map_at_r": float(torch.cat(ap_r).mean())}
    out.update({f"top{k}": float((f <= k).double().mean()) for k in (1, 5, 10)})
    return out


def worker(args: argparse.Namespace) -> None:
    from bctkit.evaluation.blockwise import full_ranking, summarize

    queries, qid, gallery, gid = make_data(args.queries, args.gallery, args.dim)
    base = rss_mib()
    t0 = time.perf_counter()
    if args.worker == "blockwise":
        s = summarize(full_ranking(queries, qid, gallery, gid, block=args.block), ks=(1, 5, 10))
        out = {k: s[k] for k in ("map", "map_at_r", "top1", "top5", "top10")}
    elif args.worker == "sort":
        out = sort_metrics(queries, qid, gallery, gid)
    else:
        out = naive(queries, qid, gallery, gid, args.naive_chunk)
    out["seconds"] = time.perf_counter() - t0
    out["peak_extra_mib"] = rss_mib() - base
    out["data_mib"] = base
    print(json.dumps(out))


def run_child(method: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", method, "--queries", str(args.queries), "--gallery",
           str(args.gallery), "--dim", str(args.dim), "--block", str(args.block), "--naive-chunk",
           str(args.naive_chunk)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--gallery", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--naive-chunk", type=int, default=256)
    ap.add_argument("--sort-max", type=float, default=2e8, help="largest queries x gallery for the sort")
    ap.add_argument("--worker", choices=("blockwise", "naive", "sort"))
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    load_start = round(os.getloadavg()[0], 2)
    block = run_child("blockwise", args)
    plain = run_child("naive", args)
    result = {
        "bench": "search_1n",
        "queries": args.queries, "gallery": args.gallery, "dim": args.dim,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_1min_start_end": [load_start, round(os.getloadavg()[0], 2)],
        "blockwise": {"block": args.block, "tile_elements": 1 << 24,
                      **{k: round(v, 4) for k, v in block.items()}},
        "naive": {"query_chunk": args.naive_chunk, "metrics": "CMC only",
                  **{k: round(v, 4) for k, v in plain.items()}},
        "ratio": round(plain["seconds"] / block["seconds"], 3),
        "cmc_agree": all(abs(block[f"top{k}"] - plain[f"top{k}"]) < 1e-9 for k in (1, 5, 10)),
        "full_score_matrix_mib": round(args.queries * args.gallery * 4 / 2**20),
    }
    if args.queries * args.gallery <= args.sort_max:
        full_sort = run_child("sort", args)
        result["sort"] = {k: round(v, 4) for k, v in full_sort.items()}
        result["ratio_sort"] = round(full_sort["seconds"] / block["seconds"], 3)
        result["map_agree"] = abs(full_sort["map"] - block["map"]) < 1e-9
    print(json.dumps(result))


if __name__ == "__main__":
    main()
