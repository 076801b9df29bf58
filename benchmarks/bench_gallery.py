"""Add and search throughput of GalleryStore against raw FAISS (IndexFlatIP) on the same vectors.

Prints one JSON line: seconds and items/s or queries/s of each, and the ratios store / raw (1.0 = as
fast as raw FAISS). The store's add is a durable SQLite commit of ids, vectors and versions; raw
FAISS only copies the vectors into memory (``add_ratio``). A durable raw baseline is measured too
(``durable_add_ratio``): the same raw adds followed by ``faiss.write_index`` and an fsync of the file,
the least a FAISS-only gallery must do to survive a crash. A durable add cannot approach an
in-memory copy (it writes every vector to disk), so the durable ratio is the one that measures the
store's own overhead. The floor of any durable add is measured as well (``write_floor_s``: the same
vector bytes written to a file and fsynced, nothing else): ``add_ratio_ceiling`` = raw add / floor is
the best ``add_ratio`` any store that makes its adds durable could reach on this disk, and
``store_vs_floor`` = floor / store add is how close the store comes to it.
The store's first search builds its index from the database and writes it to the store's index
cache (``store_index_build_s``); a reopen at the same commit reads that instead
(``store_reopen_first_search_s``, open + a one-query search); the search timings are of later, warm
searches.
Each measurement is repeated (``--repeats``, interleaved raw / store) and the fastest is reported,
which filters out other processes on a shared machine.

With ``--backend milvus-lite`` it measures bctkit's Milvus gallery instead, against bare pymilvus on
the same Milvus Lite and against the SQLite store (see ``bench_gallery_milvus.py``, which it runs).

Usage: python benchmarks/bench_gallery.py [--n 1000000] [--dim 128] [--queries 1000] [--k 10]
       [--backend sqlite|milvus-lite]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from bctkit.gallery import GalleryStore
from bctkit.gallery.ranking import normalize_rows


def persist(index: faiss.Index, path: Path) -> float:
    """Seconds to write ``index`` to ``path`` and fsync it (then the file is removed)."""
    t0 = time.perf_counter()
    faiss.write_index(index, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    took = time.perf_counter() - t0
    path.unlink()
    return took


def write_floor(vectors: np.ndarray, path: Path, batch: int) -> float:
    """Seconds to append the vectors' bytes to a file batch by batch, each batch fsynced (one
    durable write per add call, as the store commits), then the file is removed."""
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for s in range(0, len(vectors), batch):
            fh.write(vectors[s : s + batch].tobytes())
            fh.flush()
            os.fsync(fh.fileno())
    took = time.perf_counter() - t0
    path.unlink()
    return took


def main() -> None:
    """Measure and print the JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=100_000, help="items per add call (one commit each)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements of each; the best is reported")
    ap.add_argument("--dir", default=None, help="folder for the store (default: a temporary one)")
    ap.add_argument("--backend", choices=["sqlite", "milvus-lite"], default="sqlite",
                    help="sqlite: the SQLite store against raw FAISS; milvus-lite: the Milvus gallery "
                    "against bare pymilvus and the SQLite store")
    args = ap.parse_args()
    if args.backend == "milvus-lite":
        from bench_gallery_milvus import run  # beside this file

        print(json.dumps(run(args)))
        return
    rng = np.random.default_rng(0)
    vectors = normalize_rows(rng.standard_normal((args.n, args.dim), dtype=np.float32))
    queries = normalize_rows(rng.standard_normal((args.queries, args.dim), dtype=np.float32))
    ids = [f"item-{i}" for i in range(args.n)]

    raw_add, durable_add, floor, store_add, raw_search, store_search, build, reopen = ([] for _ in range(8))
    root = Path(tempfile.mkdtemp(prefix="bench-gallery-", dir=args.dir))
    try:
        for rep in range(args.repeats):  # interleaved; the best of each is reported (shared machines)
            t0 = time.perf_counter()
            raw = faiss.IndexFlatIP(args.dim)
            for s in range(0, args.n, args.batch):
                raw.add(vectors[s : s + args.batch])
            raw_add.append(time.perf_counter() - t0)
            durable_add.append(raw_add[-1] + persist(raw, root / f"raw{rep}.faiss"))
            floor.append(write_floor(vectors, root / f"floor{rep}.bin", args.batch))
            path = root / f"store{rep}"
            with GalleryStore.create(path) as store:
                store.add_version("v1", args.dim, name="v1")
                t0 = time.perf_counter()
                for s in range(0, args.n, args.batch):
                    store.add(ids[s : s + args.batch], vectors[s : s + args.batch], "v1")
                store_add.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                store.search(queries[:1], "v1", args.k)
                build.append(time.perf_counter() - t0)
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    raw_scores, raw_idx = raw.search(queries, args.k)
                    raw_search.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    res = store.search(queries, "v1", args.k)
                    store_search.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with GalleryStore.open(path) as store:
                store.search(queries[:1], "v1", args.k)
            reopen.append(time.perf_counter() - t0)
            size = (path / "gallery.sqlite").stat().st_size
            shutil.rmtree(path)
            del raw
    finally:
        shutil.rmtree(root, ignore_errors=True)
    raw_add_s, durable_add_s, floor_s, store_add_s, raw_search_s, store_search_s = (
        min(x) for x in (raw_add, durable_add, floor, store_add, raw_search, store_search))
    same = float(np.mean([ids[j] == r for row_i, row_r in zip(raw_idx, res.ids, strict=True)
                          for j, r in zip(row_i, row_r, strict=True)]))
    print(json.dumps({
        "n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k, "batch": args.batch,
        "machine": f"{platform.machine()}, {faiss.omp_get_max_threads()} threads",
        "repeats": args.repeats,
        "raw_add_s": round(raw_add_s, 3), "store_add_s": round(store_add_s, 3),
        "raw_add_items_per_s": round(args.n / raw_add_s),
        "store_add_items_per_s": round(args.n / store_add_s),
        "add_ratio": round(raw_add_s / store_add_s, 4),
        "durable_raw_add_s": round(durable_add_s, 3),
        "durable_add_ratio": round(durable_add_s / store_add_s, 4),
        "write_floor_s": round(floor_s, 3), "add_ratio_ceiling": round(raw_add_s / floor_s, 4),
        "store_vs_floor": round(floor_s / store_add_s, 4),
        "store_index_build_s": round(min(build), 3),
        "store_reopen_first_search_s": round(min(reopen), 3),
        "raw_search_s": round(raw_search_s, 3), "store_search_s": round(store_search_s, 3),
        "raw_queries_per_s": round(args.queries / raw_search_s, 1),
        "store_queries_per_s": round(args.queries / store_search_s, 1),
        "search_ratio": round(raw_search_s / store_search_s, 4),
        "same_results": same, "max_score_diff": float(np.abs(raw_scores - res.scores).max()),
        "store_bytes": size,
    }))


if __name__ == "__main__":
    main()
