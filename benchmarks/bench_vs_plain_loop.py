"""Benchmark: bctkit's trainer against a hand-written PyTorch training loop, same model and data.

Usage: python benchmarks/bench_vs_plain_loop.py [--rounds 3] [--images 512] [--small] [--device cuda]
Prints one JSON line. ``--device cuda`` runs both sides on the GPU (benchmarks/gpu_check.sh does).

Both sides train the same backbone (bctkit's r18 at 112 x 112 and r8 at 32 x 32, 3-channel images),
the same ArcFace head (s 64, m 0.5), SGD (lr 0.1, momentum 0.9, weight decay 5e-4), the same batch
of 64 and the same in-memory uint8 images, for two epochs. Each step is timestamped as it ends
(bctkit: its ``on_step`` callback; plain: after ``opt.step()``); the time of a step is the gap to the
previous step's stamp in the second epoch (the first warms caches and allocators), so it holds the
step's reading and normalising as well as its compute. images/s = batch / the median step time over
all rounds, which a burst of load from other processes moves less than a mean:

- ``bctkit``: :func:`bctkit.training.train_model` (no checkpoint file, no progress bar), as a run
  calls it: its loader, normalisation on the device, per-step learning rate, loss checks and
  history. ``independent`` trains the head alone; ``bct`` adds the influence loss through a frozen
  old classifier on the cached old features' labels (``new_classes: ignore``).
- ``plain``: a ``torch.utils.data.DataLoader`` over a ``TensorDataset`` (shuffled, drop_last,
  no workers, the images in memory as bctkit's ArraySource holds them), ``x.float() / 255``
  normalised, forward, the head's loss (plus, for bct, the cross entropy of the frozen old head
  on the known-class rows), ``zero_grad``, ``backward``, ``step``: what a user would write.

Rounds are interleaved (each round runs every case once, in a rotating order) so that load from
other processes falls on every case alike; the medians are reported. ``ratio`` = bctkit images/s /
plain images/s per (backbone, method); the goal is >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bctkit.data.sources.array import ArraySource
from bctkit.losses import CompatContext, build_term
from bctkit.models import BackboneConfig, HeadConfig, build_backbone, build_head
from bctkit.models.store import freeze
from bctkit.training import TrainConfig, train_model

HEAD = HeadConfig(type="arcface", s=64.0, m=0.5)
BATCH = 64
CLASSES = 32


def make_data(n: int, side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 3, side, side] images of CLASSES classes (a per-class pattern plus noise)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    base = rng.integers(0, 256, (CLASSES, 3, side, side))
    images = np.clip(base[labels] + rng.integers(-60, 60, (n, 3, side, side)), 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def train_cfg(device: str) -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=BATCH, seed=0, grad_clip=None, device=device,
                       optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
                       schedule={"name": "constant"})


def old_side(bb: BackboneConfig, known: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A frozen old classifier over the first ``known`` classes and the new -> old label map."""
    torch.manual_seed(1)
    head = freeze(build_head(HEAD, bb.embedding_dim, known))
    return head, torch.cat([torch.arange(known), torch.full((CLASSES - known,), -1)])


def second_epoch_gaps(stamps: list[float], steps: int) -> list[float]:
    """Seconds between consecutive step ends of the second epoch (``steps`` steps per epoch)."""
    last = stamps[steps:]
    return [b - a for a, b in zip(last, last[1:], strict=False)]


def run_bctkit(images: np.ndarray, labels: np.ndarray, bb: BackboneConfig, method: str, device: str
               ) -> list[float]:
    source = ArraySource(images, labels, name="bench")
    term = ctx = None
    if method == "bct":
        old_head, new_to_old = old_side(bb, CLASSES // 2)
        term = build_term("bct", {"new_classes": "ignore"})
        ctx = CompatContext(old_embedding_dim=bb.embedding_dim, new_embedding_dim=bb.embedding_dim,
                            num_new_classes=CLASSES, new_to_old=new_to_old,
                            train_labels=torch.from_numpy(labels), old_head=old_head)
    stamps: list[float] = []
    dev = torch.device(device)

    def stamp(_step: int, _values: dict[str, float]) -> None:
        _sync(dev)
        stamps.append(time.perf_counter())

    train_model(source, bb, HEAD, train_cfg(device), term=term, ctx=ctx, progress=False, init_seed=0,
                on_step=stamp)
    return second_epoch_gaps(stamps, len(labels) // BATCH)


def run_plain(images: np.ndarray, labels: np.ndarray, bb: BackboneConfig, method: str, device: str
              ) -> list[float]:
    dev = torch.device(device)
    torch.manual_seed(0)
    backbone = build_backbone(bb).to(dev)
    head = build_head(HEAD, bb.embedding_dim, CLASSES).to(dev)
    old_head, new_to_old = old_side(bb, CLASSES // 2) if method == "bct" else (None, None)
    if old_head is not None and new_to_old is not None:
        old_head, new_to_old = old_head.to(dev), new_to_old.to(dev)
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    data = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
    loader = DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    stamps: list[float] = []
    for _epoch in range(2):
        backbone.train()
        head.train()
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            x = (x.float() / 255.0 - 0.5) / 0.5
            feats = backbone(x)
            loss = head(feats, y)
            if old_head is not None and new_to_old is not None:
                old_y = new_to_old[y]
                known = old_y >= 0
                if bool(known.any()):
                    loss = loss + F.cross_entropy(old_head.logits(feats[known], old_y[known]), old_y[known])
            if not torch.isfinite(loss):
                raise RuntimeError("loss is not finite")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(dev)
            stamps.append(time.perf_counter())
    return second_epoch_gaps(stamps, len(labels) // BATCH)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=512, help="training images per case (r18 at 112)")
    ap.add_argument("--small", action="store_true", help="a quick check: 1 round, at most 128 images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", choices=["r18@112", "r8@32"], help="one backbone setup")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rounds, n = (1, min(args.images, 128)) if args.small else (args.rounds, args.images)
    setups = {
        "r18@112": (BackboneConfig(arch="r18", in_channels=3, image_size=112, embedding_dim=128), n),
        "r8@32": (BackboneConfig(arch="r8", in_channels=3, image_size=32, embedding_dim=128), n * 4),
    }
    if args.only:
        setups = {args.only: setups[args.only]}
    data = {name: make_data(size, bb.image_size) for name, (bb, size) in setups.items()}
    cases = [(name, method, side) for name in setups for method in ("independent", "bct")
             for side in ("bctkit", "plain")]
    gaps: dict[tuple[str, str, str], list[float]] = {c: [] for c in cases}
    for r in range(rounds):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for name, method, side in order:
            bb = setups[name][0]
            images, labels = data[name]
            fn = run_bctkit if side == "bctkit" else run_plain
            gaps[(name, method, side)] += fn(images, labels, bb, method, args.device)
    out: dict[str, object] = {"benchmark": "bctkit trainer vs a plain PyTorch loop", "rounds": rounds,
                              "batch": BATCH, "threads": args.threads, "device": args.device}
    ratios = []
    for name in setups:
        for method in ("independent", "bct"):
            b = BATCH / statistics.median(gaps[(name, method, "bctkit")])
            p = BATCH / statistics.median(gaps[(name, method, "plain")])
            ratios.append(b / p)
            timed = len(gaps[(name, method, "plain")])
            out[f"{name}/{method}"] = {"bctkit_img_s": round(b, 1), "plain_img_s": round(p, 1),
                                       "ratio": round(b / p, 3), "steps_timed": timed}
    out["min_ratio"] = round(min(ratios), 3)
    out["goal"] = ">= 0.95"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
