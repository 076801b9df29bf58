"""``gallery transform`` against re-embedding: items per second of rewriting a store's old vectors
through a transformation h (FCT's MLP, with FastFill's uncertainty) against a backfill that
re-embeds the same number of items from their images with a backbone, on the same machine in the
same run (interleaved, best of ``--repeats``). Both are full, crash-safe store writes (one commit per
batch); the transform reads no image. Also the bare MLP (h applied in memory) for the transform's
own overhead. Prints one JSON line: items/s of each and ``ratio`` = transform items/s / backfill
items/s (how many times cheaper the transform path is).

Usage: python benchmarks/bench_transform.py [--n 100000] [--inner 2048] [--model resnet18 --size 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bctkit.data.sources import ArraySource
from bctkit.gallery.backends.sqlite.store import GalleryStore
from bctkit.gallery.backfill import backfill
from bctkit.gallery.transform import transform
from bctkit.models.store import load_model
from bctkit.models.transformation import (
    Transformation,
    TransformationConfig,
    load_transformation,
    save_transformation,
)

sys.path.insert(0, str(Path(__file__).parent))
from bench_backfill import model_file  # noqa: E402  (beside this file)

OLD = "0000000000000001"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="items transformed")
    ap.add_argument("--n-embed", type=int, default=5_000, help="items re-embedded (rate is per item)")
    ap.add_argument("--dim", type=int, default=128, help="old and new embedding size")
    ap.add_argument("--inner", type=int, default=2048, help="h's inner width (FCT: 2048)")
    ap.add_argument("--batch", type=int, default=8192, help="transform batch (gallery transform's default)")
    ap.add_argument("--embed-batch", type=int, default=256)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-transform-"))
    rng = np.random.default_rng(0)
    try:
        torch.manual_seed(0)
        cfg = TransformationConfig(old_dim=args.dim, new_dim=args.dim, inner_dim=args.inner)
        net = Transformation(cfg).eval()
        save_transformation(root / "h.safetensors", net, {"old_fingerprint": OLD, "new_fingerprint": "x"})
        h = load_transformation(root / "h.safetensors")
        old = rng.standard_normal((args.n, args.dim)).astype(np.float32)
        base = root / "tbase"
        with GalleryStore.create(base) as g:
            g.add_version(OLD, args.dim)
            g.add([str(i) for i in range(args.n)], old, OLD)
        images = ArraySource(rng.integers(0, 256, (args.n_embed, 3, args.size, args.size), dtype=np.uint8),
                             np.zeros(args.n_embed, np.int64))
        model = load_model(model_file(root / "m.safetensors", args.model, args.size, args.dim))
        ebase = root / "ebase"
        with GalleryStore.create(ebase) as g:
            g.add_version(OLD, args.dim)
            g.add([images.key(i) for i in range(args.n_embed)], old[: args.n_embed], OLD)
        h.apply(old[: args.batch], batch_size=args.batch)  # warm up
        bare, tr, emb = [], [], []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            h.apply(old, batch_size=args.batch)
            bare.append(time.perf_counter() - t0)
            path = root / f"t{rep}"
            shutil.copytree(base, path)
            with GalleryStore.open(path) as g:
                t0 = time.perf_counter()
                res = transform(g, h, batch_size=args.batch, progress=False)
                tr.append(time.perf_counter() - t0)
                assert res.transformed == args.n
            shutil.rmtree(path)
            path = root / f"e{rep}"
            shutil.copytree(ebase, path)
            with GalleryStore.open(path) as g:
                t0 = time.perf_counter()
                out = backfill(g, model, images, batch_size=args.embed_batch, progress=False)
                emb.append(time.perf_counter() - t0)
                assert out.embedded == args.n_embed
            shutil.rmtree(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    t_rate, e_rate = args.n / min(tr), args.n_embed / min(emb)
    print(json.dumps({
        "benchmark": "gallery transform vs re-embedding (backfill)", "threads": torch.get_num_threads(),
        "transform": {"items": args.n, "dim": args.dim, "inner": args.inner, "batch": args.batch,
                      "items_per_s": round(t_rate, 1), "bare_mlp_items_per_s": round(args.n / min(bare), 1)},
        "reembed": {"model": f"{args.model} {args.size}x{args.size}", "items": args.n_embed,
                    "batch": args.embed_batch, "items_per_s": round(e_rate, 1)},
        "ratio": round(t_rate / e_rate, 2),
        "transform_overhead_vs_bare_mlp": round(min(tr) / min(bare), 3),
    }))


if __name__ == "__main__":
    main()
