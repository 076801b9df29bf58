"""Backfill throughput against bare extraction with the same model, images and batch size.

Bare extraction embeds every image in batches and keeps the vectors in memory (``embed_all``).
Backfill does that work plus what makes it crash-safe and resumable: the order over the store, the
image row of each id, and one durable store commit (``replace``) per batch. Prints one JSON line:
items/s of each and ``ratio`` = backfill items/s / extraction items/s (1.0 = no overhead), once for a
cheap model (where the store's work shows most) and once for resnet18 at 64 x 64. Timings are
interleaved and the best of ``--repeats`` is kept, which filters out other processes.

With ``--backend milvus-lite`` the store is a Milvus Lite gallery instead, and a 2-rank torchrun
backfill is measured against a 1-rank one (see ``bench_backfill_milvus.py``, which it runs).

Usage: python benchmarks/bench_backfill.py [--n 20000] [--batch 256] [--backend sqlite|milvus-lite]
       [--ranks 1 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bctkit.data.sources import ArraySource
from bctkit.gallery.backends.sqlite.store import GalleryStore
from bctkit.gallery.backfill import backfill
from bctkit.gallery.embed import embed_all
from bctkit.models.config import BackboneConfig
from bctkit.models.factory import build_backbone
from bctkit.models.heads import HeadConfig
from bctkit.models.store import load_model, save_model


def model_file(path: Path, arch: str, size: int, dim: int) -> Path:
    """A saved model of ``arch`` on ``size`` x ``size`` RGB input."""
    torch.manual_seed(0)
    extra = {"width": 8} if arch == "r8" else {}
    net = build_backbone(BackboneConfig(arch=arch, embedding_dim=dim, image_size=size, in_channels=3,
                                        **extra))
    meta = {"name": arch, "preprocessing": {"color": "stored", "resize": None, "crop": None,
                                            "mean": [0.5] * 3, "std": [0.5] * 3, "input": [3, size, size]}}
    save_model(path, net, None, HeadConfig(), meta)
    return path


def measure(root: Path, arch: str, size: int, n: int, batch: int, repeats: int) -> dict:
    """Best of ``repeats`` interleaved timings of extraction and of a backfill of a fresh store."""
    rng = np.random.default_rng(0)
    images = ArraySource(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8), np.zeros(n, np.int64))
    model = load_model(model_file(root / f"{arch}.safetensors", arch, size, 128))
    embed_all(model, images.subset(np.arange(min(n, 2 * batch))), batch, progress=False)  # warm up
    base = root / f"store-{arch}"
    with GalleryStore.create(base) as store:
        store.add_version("old", 64)
        store.add([images.key(i) for i in range(n)], rng.standard_normal((n, 64)).astype(np.float32), "old")
    extract, fill = [], []
    for rep in range(repeats):
        t0 = time.perf_counter()
        embed_all(model, images, batch, progress=False)
        extract.append(time.perf_counter() - t0)
        path = root / f"run-{arch}-{rep}"
        shutil.copytree(base, path)
        with GalleryStore.open(path) as store:
            t0 = time.perf_counter()
            result = backfill(store, model, images, batch_size=batch, progress=False)
            fill.append(time.perf_counter() - t0)
            assert result.embedded == n and store.count(model.fingerprint) == n
        shutil.rmtree(path)
    return {"model": f"{arch} {size}x{size}", "items": n, "extract_items_per_s": round(n / min(extract), 1),
            "backfill_items_per_s": round(n / min(fill), 1), "commits": result.batches,
            "ratio": round(min(extract) / min(fill), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timings; the best of each is kept")
    ap.add_argument("--backend", choices=["sqlite", "milvus-lite"], default="sqlite",
                    help="the store: the SQLite store, or a Milvus Lite gallery (with torchrun ranks)")
    ap.add_argument("--ranks", type=int, nargs="*", default=[1, 2],
                    help="milvus-lite: torchrun process counts to measure (none: skip torchrun)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    if args.backend == "milvus-lite":
        from bench_backfill_milvus import run  # beside this file

        try:
            print(json.dumps(run(args, root, model_file)))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    try:
        rows = [measure(root, "r8", 32, args.n, args.batch, args.repeats),
                measure(root, "resnet18", 64, max(args.batch, args.n // 10), args.batch, args.repeats)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"n": args.n, "batch": args.batch, "threads": torch.get_num_threads(), "runs": rows}))


if __name__ == "__main__":
    main()
