"""Backfill throughput on a Milvus Lite gallery: against bare extraction with the same model, images
and batch size, and a 2-rank torchrun backfill against a 1-rank one.

Run by ``python benchmarks/bench_backfill.py --backend milvus-lite`` (the same models and images as
its SQLite measurement: a cheap r8 at 32 x 32, where the store's work shows most, and resnet18 at
64 x 64). Each measurement starts from a fresh Milvus Lite gallery of the items at an old 64-d
version (created and filled untimed) and re-embeds them all with the 128-d model:

- bare extraction: ``embed_all`` of every image, the vectors kept in memory;
- backfill: :func:`bctkit.gallery.backfill.backfill` in this process (per batch one ``replace``: a
  read of the batch's entities, then an upsert of whole entities);
- torchrun: ``python -m torch.distributed.run --standalone --nproc_per_node=R`` of this file in
  worker mode, for R in ``--ranks`` (default 1 and 2): every rank joins the process group, embeds
  two batches to warm up, and calls
  :func:`~bctkit.gallery.backfill.distributed_backfill` (as ``bctkit gallery backfill`` does under
  torchrun); with Milvus Lite, which admits one process, rank 0 writes every batch in plan order and
  the other ranks only embed. Rank 0 times the call (opening the store, planning, embedding,
  writing; ``ranks_R_items_per_s``); the command's wall time, process start-up included, is
  reported too (``ranks_R_wall_s``). torchrun gives each of several ranks one thread
  (OMP_NUM_THREADS=1) unless the environment sets it; one rank keeps torch's default
  (``rank_threads``).

Ratios: ``ratio`` = extraction seconds / backfill seconds (1.0 = no overhead); ``ranks_ratio`` =
1-rank seconds / 2-rank seconds (> 1: two ranks are faster; on a machine of few cores expect little).
Timings are interleaved and the best of ``--repeats`` is kept, which filters out other processes;
``loadavg_start`` / ``loadavg_end`` are ``os.getloadavg()``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bctkit.data.sources import ArraySource
from bctkit.gallery.backfill import backfill
from bctkit.gallery.embed import embed_all
from bctkit.gallery.interface import create_gallery, open_gallery
from bctkit.models.store import load_model

OLD_DIM, NEW_DIM = 64, 128


def fresh_store(store: str, keys: list[str], old: np.ndarray) -> None:
    """A new Milvus Lite gallery at ``store`` holding ``keys`` at the old version (``old`` vectors)."""
    with create_gallery(store, dim=NEW_DIM) as g:
        g.add_version("old", OLD_DIM)
        g.add(keys, old, "old")


def drop(store: str) -> None:
    """Remove the Lite folder (or file) of a ``milvus-lite:PATH.db`` store string."""
    path = Path(store[len("milvus-lite:"):].partition("#")[0])
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def torchrun(ranks: int, store: str, model: Path, images: Path, batch: int) -> tuple[dict, float]:
    """(rank 0's JSON record, wall seconds) of a ``ranks``-process torchrun backfill of ``store``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           __file__, "--worker", store, str(model), str(images), "--batch", str(batch)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"torchrun ({ranks} ranks) failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    line = [x for x in out.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line), wall


def measure(root: Path, model_path: Path, arch: str, size: int, n: int, batch: int, repeats: int,
            ranks: list[int]) -> dict:
    """Best of ``repeats`` interleaved timings of extraction, an in-process backfill and each torchrun
    backfill, each backfill of a fresh gallery."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    images = ArraySource(arr, np.zeros(n, np.int64))
    npy = root / f"images-{arch}.npy"
    np.save(npy, arr)
    keys = [images.key(i) for i in range(n)]
    old = rng.standard_normal((n, OLD_DIM)).astype(np.float32)
    model = load_model(model_path)
    embed_all(model, images.subset(np.arange(min(n, 2 * batch))), batch, progress=False)  # warm up
    extract: list[float] = []
    fill: list[float] = []
    runs: dict[int, list[float]] = {r: [] for r in ranks}
    walls: dict[int, list[float]] = {r: [] for r in ranks}
    threads: dict[int, int] = {}
    for rep in range(repeats):
        t0 = time.perf_counter()
        embed_all(model, images, batch, progress=False)
        extract.append(time.perf_counter() - t0)
        store = f"milvus-lite:{root}/{arch}-{rep}.db"
        fresh_store(store, keys, old)
        with open_gallery(store) as g:
            t0 = time.perf_counter()
            result = backfill(g, model, images, batch_size=batch, progress=False)
            fill.append(time.perf_counter() - t0)
            assert result.embedded == n and g.count(model.fingerprint) == n
        drop(store)
        for r in ranks:
            store = f"milvus-lite:{root}/{arch}-{rep}-r{r}.db"
            fresh_store(store, keys, old)
            rec, wall = torchrun(r, store, model_path, npy, batch)
            assert rec["embedded"] == n, rec
            with open_gallery(store) as g:
                assert g.count(model.fingerprint) == n
            drop(store)
            runs[r].append(rec["seconds"])
            walls[r].append(wall)
            threads[r] = rec["threads"]
    row = {"model": f"{arch} {size}x{size}", "items": n, "extract_items_per_s": round(n / min(extract), 1),
           "backfill_items_per_s": round(n / min(fill), 1), "commits": result.batches,
           "ratio": round(min(extract) / min(fill), 4)}
    for r in ranks:
        row[f"ranks_{r}_items_per_s"] = round(n / min(runs[r]), 1)
        row[f"ranks_{r}_wall_s"] = round(min(walls[r]), 2)
    if 1 in ranks and 2 in ranks:
        row["ranks_ratio"] = round(min(runs[1]) / min(runs[2]), 4)
    row["rank_threads"] = threads
    row["all_s"] = {"extract": [round(x, 3) for x in extract], "backfill": [round(x, 3) for x in fill],
                    **{f"ranks_{r}": [round(x, 3) for x in runs[r]] for r in ranks}}
    return row


def run(args: argparse.Namespace, root: Path, model_file: Callable[[Path, str, int, int], Path]) -> dict:
    """The JSON record of ``bench_backfill.py --backend milvus-lite``; ``model_file``: its
    ``model_file(path, arch, size, dim)``."""
    load0 = os.getloadavg()
    rows = []
    for arch, size, n in (("r8", 32, args.n), ("resnet18", 64, max(args.batch, args.n // 10))):
        path = model_file(root / f"{arch}.safetensors", arch, size, NEW_DIM)
        rows.append(measure(root, path, arch, size, n, args.batch, args.repeats, args.ranks))
    return {"backend": "milvus-lite", "n": args.n, "batch": args.batch, "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load0],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()], "runs": rows}


def worker(argv: list[str]) -> None:
    """One torchrun rank: join the process group, backfill, rank 0 prints a JSON line."""
    from bctkit.engine.compute import Engine
    from bctkit.engine.distributed import close_process_group, is_main
    from bctkit.gallery.backfill import distributed_backfill

    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("store")
    ap.add_argument("model")
    ap.add_argument("images")
    ap.add_argument("--batch", type=int, required=True)
    args = ap.parse_args(argv)
    Engine.create("cpu")  # joins the process group under torchrun
    arr = np.load(args.images)
    images = ArraySource(arr, np.zeros(len(arr), np.int64))
    model = load_model(args.model)
    embed_all(model, images.subset(np.arange(min(len(arr), 2 * args.batch))), args.batch, progress=False)
    t0 = time.perf_counter()  # after a warm-up, as the in-process timings
    res = distributed_backfill(args.store, model, images, batch_size=args.batch, progress=False)
    took = time.perf_counter() - t0
    main = is_main()
    close_process_group()
    if main:
        print(json.dumps({"seconds": took, "embedded": res.embedded, "threads": torch.get_num_threads()}),
              flush=True)


if __name__ == "__main__" and "--worker" in sys.argv:
    worker(sys.argv[1:])
