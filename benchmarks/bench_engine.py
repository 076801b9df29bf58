"""Benchmark: the training engine through the real training loop (train_model: loader, engine, DDP).

Usage: python benchmarks/bench_engine.py [--images N] [--epochs E]
Prints three JSON lines, each measured in this run:

- ``ddp_cpu``: training images/s of 1 process x 1 thread against ``torchrun --nproc_per_node=2`` x 1
  thread each (gloo), the same global batch; ratio = 2-process / 1-process throughput (2.0 ideal on 2
  free cores), with BatchNorm over the global batch (the default) and per process (``local``).
- ``precision_cpu``: step time fp32 vs bf16 autocast on this CPU (ratio = median over rounds of
  bf16 / fp32 time).
- ``compat_overhead``: images/s of the independent model against l2 and bct with cached old features,
  through the same loop, in ``--rounds`` rounds of the three (ratio = median over rounds of
  independent / method throughput; goal <= 1.05).

Setup: r8 / width 16 on 32x32 grey synthetic images, embedding 128, ArcFace, batch 128, SGD; the
first epoch is a warm-up and only the last epoch's images/s counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bctkit.data import SyntheticSpec, make_synthetic
from bctkit.engine.distributed import is_main
from bctkit.features import extract
from bctkit.losses import CompatContext, build_term
from bctkit.models import BackboneConfig, HeadConfig
from bctkit.models.factory import build_backbone
from bctkit.models.heads import build_head
from bctkit.models.store import freeze
from bctkit.training import TrainConfig, train_model

BB = BackboneConfig(arch="r8", width=16, embedding_dim=128, image_size=32)
HEAD = HeadConfig(type="arcface", s=64, m=0.5)


def _throughput(images: int, epochs: int, precision: str = "fp32", method: str | None = None,
                batchnorm: str = "global") -> float:
    """Last epoch's training images/s (in every rank: the loop's own measurement)."""
    data = make_synthetic(SyntheticSpec(num_classes=images // 16, images_per_class=16, size=32, seed=1))
    cfg = TrainConfig(epochs=epochs, batch_size=128, optimizer={"name": "sgd", "lr": 0.05}, device="cpu",
                      precision=precision, batchnorm=batchnorm)
    term = ctx = None
    if method is not None:
        torch.manual_seed(3)
        old = freeze(build_backbone(BB))
        labels = torch.from_numpy(data.labels)
        c = int(labels.max()) + 1
        ctx = CompatContext(old_embedding_dim=128, new_embedding_dim=128, num_new_classes=c,
                            new_to_old=torch.arange(c), train_labels=labels,
                            old_train_feats=extract(old, data, progress=False), old_model=old,
                            old_head=freeze(build_head(HEAD, 128, c)), train_images=data)
        term = build_term(method, {})
    res = train_model(data, BB, HEAD, cfg, term=term, ctx=ctx, progress=False)
    return float(res.history[-1]["images_per_s"])


def _child(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    rates = {bn: _throughput(args.images, args.epochs, batchnorm=bn) for bn in ("global", "local")}
    if is_main():
        Path(args.child).write_text(json.dumps(rates))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3840)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, 2):
            out = Path(tmp) / f"{procs}.json"
            launcher = [sys.executable] if procs == 1 else [
                str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={procs}"]
            subprocess.run([*launcher, __file__, "--images", str(args.images), "--epochs", str(args.epochs),
                            "--child", str(out)], env=env, check=True, capture_output=True)
            rates[procs] = json.loads(out.read_text())
    one = rates[1]["global"]  # one process: BatchNorm is the same either way
    print(json.dumps({"bench": "ddp_cpu", "img_s_1proc": one, "img_s_2proc": rates[2]["global"],
                      "ratio": round(rates[2]["global"] / one, 3), "img_s_2proc_local_bn": rates[2]["local"],
                      "ratio_local_bn": round(rates[2]["local"] / one, 3), "cpus": os.cpu_count()}))

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    # Paired and repeated: load from other processes shifts every configuration of a round alike.
    configs: dict[str, dict[str, str]] = {
        "independent": {}, "bf16": {"precision": "bf16"}, "l2": {"method": "l2"}, "bct": {"method": "bct"}}
    rounds = [{name: _throughput(args.images, args.epochs, **kw) for name, kw in configs.items()}
              for _ in range(args.rounds)]

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    def ratio(num: str, den: str) -> float:
        return round(statistics.median(r[num] / r[den] for r in rounds), 3)

    print(json.dumps({"bench": "precision_cpu", "rounds": args.rounds, "img_s_fp32": median("independent"),
                      "img_s_bf16": median("bf16"),
                      "ratio_time_bf16_over_fp32": ratio("independent", "bf16")}))
    out: dict[str, object] = {"bench": "compat_overhead", "rounds": args.rounds,
                              "img_s_independent": median("independent")}
    for method in ("l2", "bct"):
        out[f"img_s_{method}"] = median(method)
        out[f"ratio_{method}"] = ratio("independent", method)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
