"""Benchmark: exact blockwise top-k search vs a plain GEMM of one block, and faiss Flat.

Usage: python benchmarks/bench_search.py [--small] [--skip-faiss]
Prints one JSON line. Full size: gallery 1,000,000 x 512 float32 (unit rows), 10,000 queries, top-10.
GFLOP/s = 2 Nq Ng d / time. The reference is torch.mm of one (block_queries x d) @ (d x
block_gallery) tile, measured in the same run just before and just after the search (mean of the
two); the ratio shows what the blocking and top-k merging cost.
Peak memory is ru_maxrss of this process (it includes the gallery itself, and faiss's copy of it
when faiss runs; faiss runs last so the topk_search peak is also reported on its own).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch

from bctkit.evaluation.search import faiss_search, topk_search


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gemm_gflops(bq: int, bg: int, d: int, repeats: int = 7) -> float:
    """Median throughput of torch.mm on one (bq x d) @ (d x bg) tile into a preallocated output."""
    a = torch.randn(bq, d)
    b = torch.randn(bg, d)
    out = torch.empty(bq, bg)
    torch.mm(a, b.T, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b.T, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * bq * bg * d / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="100,000 x 512 gallery, 2,000 queries")
    ap.add_argument("--skip-faiss", action="store_true")
    ap.add_argument("--block-queries", type=int, default=2048)
    ap.add_argument("--block-gallery", type=int, default=32768)
    args = ap.parse_args()
    n_g, n_q = (100_000, 2_000) if args.small else (1_000_000, 10_000)
    d, k = 512, 10
    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(n_g, d, generator=gen), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(n_q, d, generator=gen), dim=1)
    rss_data = rss_mib()
    load_start = round(os.getloadavg()[0], 2)

    tile = (min(args.block_queries, n_q), min(args.block_gallery, n_g), d)
    ref_before = gemm_gflops(*tile)
    t0 = time.perf_counter()
    scores, idx = topk_search(
        queries, gallery, k, block_queries=args.block_queries, block_gallery=args.block_gallery
    )
    t_topk = time.perf_counter() - t0
    rss_topk = rss_mib()
    ref_after = gemm_gflops(*tile)
    ref = (ref_before + ref_after) / 2
    flops = 2 * n_q * n_g * d
    result = {
        "bench": "search",
        "gallery": [n_g, d],
        "queries": n_q,
        "k": k,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min_start_end": [load_start, round(os.getloadavg()[0], 2)],
        "blocks": [args.block_queries, args.block_gallery],
        "topk_search_s": round(t_topk, 2),
        "topk_search_gflops": round(flops / t_topk / 1e9, 1),
        "gemm_block_gflops": round(ref, 1),
        "gemm_block_gflops_before_after": [round(ref_before, 1), round(ref_after, 1)],
        "ratio_to_gemm": round(flops / t_topk / 1e9 / ref, 3),
        "ratio_goal": 0.6,
        "peak_rss_mib_after_data": round(rss_data, 0),
        "peak_rss_mib_after_topk": round(rss_topk, 0),
        "full_score_matrix_mib": round(n_q * n_g * 4 / 2**20, 0),
    }
    if not args.skip_faiss:
        sub = slice(0, min(n_q, 2000))
        t0 = time.perf_counter()
        f_scores, f_idx = faiss_search(queries, gallery, k)
        t_faiss = time.perf_counter() - t0
        result["faiss_flat_s"] = round(t_faiss, 2)
        result["faiss_flat_gflops"] = round(flops / t_faiss / 1e9, 1)
        result["faiss_top1_agrees"] = float((torch.as_tensor(f_idx[sub, 0]) == idx[sub, 0]).float().mean())
        result["faiss_max_abs_score_diff"] = float((torch.as_tensor(f_scores) - scores).abs().max())
        result["peak_rss_mib_after_faiss"] = round(rss_mib(), 0)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
