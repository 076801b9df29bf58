"""Benchmark: the class-sharded margin head (Partial FC) against the replicated head under 2 processes.

Usage: python benchmarks/bench_partial_fc.py [--classes N] [--dim D] [--batch B] [--steps S]
(launches itself with ``torchrun --nproc_per_node=2``; gloo on CPU). Prints one JSON line.

Per rank and per configuration: the bytes of the class matrix, its gradient and its SGD momentum
(exact, from the tensors), and the median time of a head step on the global batch: forward, backward,
gradient averaging as DDP does it for a replicated matrix (an all-reduce of the whole gradient), SGD
step. ``replicated``: every rank holds all classes; ``sharded``: each holds its block (exact softmax
over all classes); ``sampled``: sharded with sample_rate 0.1. Ratios are replicated / configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from bctkit.engine.distributed import init_from_env, is_main, world_size
from bctkit.models.heads import HeadConfig, build_head
from bctkit.models.sharded_head import ShardedHead

CFG = HeadConfig(type="arcface", s=64, m=0.5)


def _step_times(head: torch.nn.Module, sharded: bool, feats: torch.Tensor, labels: torch.Tensor,
                steps: int) -> list[float]:
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        x = feats.clone().requires_grad_(True)
        loss = head(x, labels, step) if sharded else head(x, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not sharded:  # what DDP does to a replicated matrix's gradient
            dist.all_reduce(head.weight.grad)
            head.weight.grad /= world_size()
        opt.step()
        dist.barrier()
        if step:  # the first step allocates the momentum
            times.append(time.perf_counter() - t0)
    return times


def _bytes(head: torch.nn.Module) -> int:
    """Class matrix + gradient + momentum of this rank."""
    return 3 * head.weight.numel() * head.weight.element_size()


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"))
    w = world_size()
    per = args.batch // w
    gen = torch.Generator().manual_seed(dist.get_rank())
    feats = torch.randn(per, args.dim, generator=gen)
    labels = torch.randint(0, args.classes, (per,), generator=gen)
    out: dict[str, object] = {"bench": "partial_fc", "processes": w, "classes": args.classes, "dim": args.dim,
                              "global_batch": args.batch}
    heads = {
        "replicated": (build_head(CFG, args.dim, args.classes), False),
        "sharded": (ShardedHead(CFG, args.dim, args.classes), True),
        "sampled": (ShardedHead(CFG, args.dim, args.classes, sample_rate=0.1), True),
    }
    for name, (head, sharded) in heads.items():
        ms = statistics.median(_step_times(head, sharded, feats, labels, args.steps)) * 1000
        out[f"{name}_ms_per_step"] = round(ms, 2)
        out[f"{name}_mb_per_rank"] = round(_bytes(head) / 2**20, 1)
    for name in ("sharded", "sampled"):
        out[f"ratio_time_{name}"] = round(out["replicated_ms_per_step"] / out[f"{name}_ms_per_step"], 3)
        out[f"ratio_memory_{name}"] = round(out["replicated_mb_per_rank"] / out[f"{name}_mb_per_rank"], 3)
    if is_main():
        print(json.dumps(out), flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        child(args)
        return
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", __file__, *sys.argv[1:]], env=env,
                         capture_output=True, text=True)
    if res.returncode:
        sys.exit(res.stderr[-2000:])
    print(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
