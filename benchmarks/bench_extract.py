"""Extraction throughput: bctkit.features.extract (batched, inference mode) vs the naive way (one
image at a time with autograd on), same model and images, one run. Prints one JSON line.

``--to-file``: ``bctkit extract``'s library call (an image folder of PNG files, the model's saved
preprocessing, chunk files for resuming, row keys, one atomic feature file) against the naive way
(decode, preprocess and embed one image at a time, then save) and against the same batched
extraction kept in memory (``features.extract``: what chunking and writing cost)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bctkit.data.transforms import Preprocess
from bctkit.features import extract
from bctkit.models import BackboneConfig, build_backbone


def naive(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    model.eval()
    pre = Preprocess()
    one = [model(pre.normalize(torch.from_numpy(images[i : i + 1]))) for i in range(len(images))]
    return torch.cat(one).detach()


def to_file(n: int, naive_n: int, batch: int, workers: int) -> dict:
    """Times of extract_to_file, features.extract on the same Feed, and the per-image way."""
    from PIL import Image

    from bctkit.data.sources.imagefolder import ImageFolderSource
    from bctkit.engine.loader import Feed
    from bctkit.extract import extract_to_file
    from bctkit.features import load_features
    from bctkit.models.heads import HeadConfig
    from bctkit.models.store import load_model, save_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        for i in range(n):
            (root / "data" / f"id{i % 50:02d}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                root / "data" / f"id{i % 50:02d}" / f"{i:06d}.png")
        torch.manual_seed(0)
        cfg = BackboneConfig(arch="r14", width=16, in_channels=3, image_size=32, embedding_dim=128)
        pre = {"color": "rgb", "resize": [32, 32], "crop": None, "mean": [0.5], "std": [0.5],
               "input": [3, 32, 32]}
        path = root / "models" / "m" / "model.safetensors"
        save_model(path, build_backbone(cfg).eval(), None, HeadConfig(), {"name": "m", "preprocessing": pre})
        model = load_model(path).backbone
        source = ImageFolderSource(root / "data")
        feed = Feed(source, Preprocess.from_spec(pre), workers)
        extract(model, Feed(source.subset(np.arange(batch)), feed.preprocess), batch, progress=False)
        t0 = time.perf_counter()
        extract_to_file(path, source, root / "f.safetensors", batch_size=batch, workers=workers, device="cpu",
                        chunk_batches=8, progress=False)
        file_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        in_memory = extract(model, feed, batch, progress=False)
        memory_s = time.perf_counter() - t0
        diff = float((load_features(root / "f.safetensors").feats - in_memory).abs().max())
        t0 = time.perf_counter()
        rows = []
        with torch.no_grad():
            for i in range(naive_n):
                x = torch.tensor(feed.preprocess(source.read(i))[None])
                rows.append(model(feed.preprocess.normalize(x)))
        np.save(root / "naive.npy", torch.cat(rows).numpy())
        naive_s = (time.perf_counter() - t0) * n / naive_n
    return {"benchmark": "extract_to_file", "images": n, "batch_size": batch, "workers": workers,
            "extract_to_file_s": round(file_s, 3), "images_per_s": round(n / file_s, 1),
            "in_memory_extract_s": round(memory_s, 3), "naive_s_extrapolated": round(naive_s, 3),
            "naive_timed_images": naive_n, "speedup_vs_naive": round(naive_s / file_s, 2),
            "ratio_to_in_memory": round(file_s / memory_s, 3), "max_abs_diff": diff,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--to-file", action="store_true", help="time bctkit extract's library call (see above)")
    ap.add_argument("--workers", type=int, default=2, help="--to-file: loader workers")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--naive-images", type=int, default=512, help="naive path is timed on a subset")
    ap.add_argument("--arch", default="r14")
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    if args.small:
        args.images, args.naive_images = 512, 64
    if args.to_file:
        print(json.dumps(to_file(args.images, args.naive_images, 256, args.workers)))
        return
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(arch=args.arch, width=16, embedding_dim=128))
    images = np.random.default_rng(0).integers(0, 256, (args.images, 1, 32, 32), dtype=np.uint8)
    extract(model, images[:256], progress=False)
    t0 = time.perf_counter()
    feats = extract(model, images, batch_size=512, progress=False)
    fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = naive(model, images[: args.naive_images])
    slow = (time.perf_counter() - t0) * args.images / args.naive_images
    diff = float((feats[: args.naive_images] - ref).abs().max())
    print(json.dumps({
        "benchmark": "extract", "arch": args.arch, "images": args.images,
        "bctkit_s": round(fast, 3), "bctkit_images_per_s": round(args.images / fast, 1),
        "naive_s_extrapolated": round(slow, 3), "naive_timed_images": args.naive_images,
        "speedup": round(slow / fast, 2), "max_abs_diff": diff, "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
