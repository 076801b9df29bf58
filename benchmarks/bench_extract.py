"""Extraction throughput: bctkit.features.extract (batched, inference mode) vs the naive way (one
image at a time with autograd on), same model and images, one run. Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import time

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--naive-images", type=int, default=512, help="naive path is timed on a subset")
    ap.add_argument("--arch", default="r14")
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    if args.small:
        args.images, args.naive_images = 512, 64
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
