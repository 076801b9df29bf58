"""Benchmark: iresnet50 (arcface_torch layout, 112x112 RGB, 512-d embedding) forward throughput on the
CPU in eval mode, fp32 against bf16 autocast.

Usage: python benchmarks/bench_iresnet.py [--batch B] [--iters N] [--threads T]
Prints one JSON line. Timing is paired so that load from other processes affects both alike: each
iteration runs one fp32 and one bf16 forward of the same batch, in a random order; ``*_images_per_s``
is the batch size over the median forward time, ``ratio_bf16_over_fp32`` the median over iterations
of (bf16 images/s / fp32 images/s in the same iteration). ``min_cosine`` is the lowest cosine
similarity between a bf16 and the fp32 embedding of the same image: what bf16 costs in accuracy.
The model is randomly initialised, its BatchNorm statistics set from the benchmark batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F

from bctkit.models import BackboneConfig, build_backbone


def forward(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> tuple[float, torch.Tensor]:
    """Seconds for one forward pass, and its output in fp32."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t0 = time.perf_counter()
    with torch.inference_mode(), ctx:
        out = model(x)
    return time.perf_counter() - t0, out.float()


def calibrate(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``x`` (one train-mode pass), then eval
    mode. With its initial statistics a randomly initialised IResNet's activations grow by orders of
    magnitude per block, which would make the bf16 / fp32 comparison meaningless."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly its statistics
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(arch="iresnet50"))
    x = torch.randn(args.batch, 3, 112, 112)
    calibrate(model, x)
    for _ in range(args.warmup):
        forward(model, x, False)
        forward(model, x, True)
    rng = random.Random(0)
    times: dict[bool, list[float]] = {False: [], True: []}
    ratios, min_cos = [], 1.0
    for _ in range(args.iters):
        order = [False, True]
        rng.shuffle(order)
        outs = {}
        for bf16 in order:
            t, outs[bf16] = forward(model, x, bf16)
            times[bf16].append(t)
        ratios.append(times[False][-1] / times[True][-1])
        min_cos = min(min_cos, float(F.cosine_similarity(outs[True], outs[False]).min()))
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    print(json.dumps({
        "benchmark": "iresnet50_forward", "device": "cpu", "mode": "eval", "image": [3, 112, 112],
        "batch": args.batch, "iters": args.iters, "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fp32_images_per_s": round(args.batch / fp32, 1), "bf16_images_per_s": round(args.batch / bf16, 1),
        "ratio_bf16_over_fp32": round(statistics.median(ratios), 3), "min_cosine": round(min_cos, 5),
    }))


if __name__ == "__main__":
    main()
