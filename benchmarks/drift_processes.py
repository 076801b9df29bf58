"""How far a run with 2 processes drifts from one process over training (torchrun, gloo on CPU).

Usage: python benchmarks/drift_processes.py [--epochs 8] [--seed 666]
Prints one JSON line. Trains the same model four times through train_model, 1 thread per process:
``1proc`` (1 process), ``2proc`` (``torchrun --nproc_per_node=2``, the same global batch),
``1proc_avx2`` (1 process with ATEN_CPU_CAPABILITY=avx2: the same steps, other float rounding in
torch's kernels where the CPU has AVX512) and ``1proc_seed`` (1 process, train seed + 1: the same
initial weights, another batch order and augmentation). For each of the last three it reports, at
global steps 1, 2, 5, 10, 20, 50, 100, 200 and the last, the difference from ``1proc``: ``rel_l2`` =
||w - w_1proc|| / ||w_1proc|| over the backbone's parameters (BatchNorm's running statistics left
out), ``max_abs`` = the largest absolute difference of a parameter, ``loss_rel`` =
|loss - loss_1proc| / loss_1proc of that step's training loss.

Setup: synthetic-quick's new-model settings (r8 / width 16 on 32x32 grey synthetic images, 300
classes x 16 images, embedding 128, ArcFace s 32 m 0.3, batch 128, SGD lr 0.1 momentum 0.9 weight
decay 5e-4, cosine with 1 warm-up epoch, grad_clip 5): 37 steps an epoch. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import bctkit.training.trainer as trainer
from bctkit.data import SyntheticSpec, make_synthetic
from bctkit.engine.distributed import close_process_group, is_main
from bctkit.models import BackboneConfig, HeadConfig
from bctkit.training import TrainConfig, train_model

BB = BackboneConfig(arch="r8", width=16, embedding_dim=128, image_size=32)
HEAD = HeadConfig(type="arcface", s=32, m=0.3)
AT = [1, 2, 5, 10, 20, 50, 100, 200]


def _child(out: Path, epochs: int, seed: int) -> None:
    torch.set_num_threads(1)
    data = make_synthetic(SyntheticSpec(num_classes=300, images_per_class=16, size=32, channels=1, seed=0))
    cfg = TrainConfig(epochs=epochs, batch_size=128, seed=seed, device="cpu", grad_clip=5.0,
                      optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
                      schedule={"name": "cosine", "warmup_epochs": 1})
    last = epochs * (len(data.labels) // 128)
    built: list[torch.nn.Module] = []
    build = trainer.build_backbone
    trainer.build_backbone = lambda c: built.append(build(c)) or built[-1]  # to read the weights
    snaps: dict[str, torch.Tensor] = {}
    losses: dict[int, float] = {}

    def on_step(step: int, values: dict[str, float]) -> None:
        if step + 1 in AT or step + 1 == last:
            losses[step + 1] = values["loss"]
            snaps[str(step + 1)] = torch.cat([p.detach().flatten() for p in built[0].parameters()]).clone()

    train_model(data, BB, HEAD, cfg, progress=False, init_seed=5, on_step=on_step)
    if is_main():
        torch.save({"w": snaps, "loss": losses}, out)
    close_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=666)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        _child(Path(args.child), args.epochs, args.seed)
        return
    runs = {"1proc": (1, {}, args.seed), "2proc": (2, {}, args.seed),
            "1proc_avx2": (1, {"ATEN_CPU_CAPABILITY": "avx2"}, args.seed),
            "1proc_seed": (1, {}, args.seed + 1)}
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (procs, extra, seed) in runs.items():
            out = Path(tmp) / f"{name}.pt"
            launcher = [sys.executable] if procs == 1 else [
                str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={procs}"]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}
            subprocess.run([*launcher, __file__, "--epochs", str(args.epochs), "--seed", str(seed),
                            "--child", str(out)], env=env, check=True, capture_output=True)
            found[name] = torch.load(out)
    ref = found.pop("1proc")
    steps = [int(s) for s in ref["w"]]
    res: dict[str, object] = {"bench": "drift_processes", "epochs": args.epochs, "steps": steps,
                              "cpus": os.cpu_count(), "torch": torch.__version__}
    for name, run in found.items():
        rows = {"rel_l2": [], "max_abs": [], "loss_rel": []}
        for s in steps:
            a, b = ref["w"][str(s)].double(), run["w"][str(s)].double()
            rows["rel_l2"].append(float(f"{float((b - a).norm() / a.norm()):.3g}"))
            rows["max_abs"].append(float(f"{float((b - a).abs().max()):.3g}"))
            rows["loss_rel"].append(float(f"{abs(run['loss'][s] - ref['loss'][s]) / ref['loss'][s]:.3g}"))
        res[name] = rows
    print(json.dumps(res))


if __name__ == "__main__":
    main()
