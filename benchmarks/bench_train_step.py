"""Benchmark: cost of each compatibility term per training step, with cached old features and the
naive way (running the frozen old model forward in every step to get o).

Usage: python benchmarks/bench_train_step.py [--small] [--cycles N] [--threads T]
Prints one JSON line. Setup: backbone r8 / width 16 on 32x32 grey images, embedding 128, ArcFace head
(s 64, m 0.5) over 1000 new classes (700 known to the old ArcFace classifier), batch 128, SGD; bt2
trains its widened model (the same backbone inside BT^2's basis transformation, k = 32). A
step is what the trainer does (augmentation left out, the same for every configuration): forward,
base loss on ``term.mix(feats)`` plus the term's loss, backward, optimiser step. Timing is paired
so that load from other processes affects every configuration alike: in each cycle every
configuration runs one step on the same batch, in a random order; ``ms_per_step`` is the median
step time, ``ratio_*`` the median over cycles of (step time / independent's step time in the same
cycle). Goal: ratio <= 1.05 with cached features. ``naive`` runs the same methods but computes o
with the old model every step.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

import numpy as np
import torch

import bctkit.losses.bct
import bctkit.losses.bt2
import bctkit.losses.contrastive
import bctkit.losses.l2
import bctkit.losses.lwf  # noqa: F401  (registration of the methods benchmarked)
from bctkit.data.transforms import Preprocess
from bctkit.features import extract
from bctkit.losses.base import CompatBatch, CompatContext, CompatibilityTerm, build_term
from bctkit.models import BackboneConfig, HeadConfig, build_backbone, build_head
from bctkit.models.store import freeze

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "independent": ("independent", {}),
    "l2": ("l2", {}),
    "bct": ("bct", {}),
    "bct-kd": ("bct", {"kd": True}),
    "contrastive": ("contrastive", {}),
    "lwf": ("lwf", {}),
    "bt2": ("bt2", {}),
}


class Config:
    """One benchmarked configuration: its own copies of the new model, head, term and optimiser."""

    def __init__(self, method: str, params: dict[str, Any], naive: bool, bcfg: BackboneConfig,
                 head: torch.nn.Module, ctx: CompatContext, old_model: torch.nn.Module) -> None:
        self.term: CompatibilityTerm = build_term(method, params)
        torch.manual_seed(0)
        self.backbone = build_backbone(self.term.backbone_config(bcfg, bcfg.embedding_dim))
        self.head = copy.deepcopy(head)
        self.term.setup(ctx)
        self.naive, self.ctx, self.old_model = naive, ctx, old_model
        params_all = [*self.backbone.parameters(), *self.head.parameters(), *self.term.parameters()]
        self.opt = torch.optim.SGD([p for p in params_all if p.requires_grad], lr=0.01, momentum=0.9)
        self.old_labels = ctx.new_to_old[ctx.train_labels]
        self.backbone.train()

    def step(self, images: torch.Tensor, idx: torch.Tensor) -> None:
        x = Preprocess().normalize(images[idx])
        y = self.ctx.train_labels[idx]
        if self.naive:
            with torch.no_grad():
                o = self.old_model(x)
        else:
            assert self.ctx.old_train_feats is not None
            o = self.ctx.old_train_feats[idx]
        base, feats = self.backbone.forward_train(x)
        par = self.ctx.paragon_train_feats
        batch = CompatBatch(new_feats=feats, base_feats=base, labels=y, index=idx, epoch=0, old_feats=o,
                            old_labels=self.old_labels[idx], paragon_feats=None if par is None else par[idx])
        loss = self.head(self.term.mix(base, batch), y) + self.term(batch).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="fewer images, classes and steps (quick check)")
    ap.add_argument("--cycles", type=int, default=None, help="timed steps per configuration")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_images, n_new, n_known = (1024, 200, 140) if args.small else (4096, 1000, 700)
    cycles = args.cycles or (8 if args.small else 24)
    batch_size, dim = 128, 128

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images_np = rng.integers(0, 256, (n_images, 1, 32, 32), dtype=np.uint8)
    images = torch.from_numpy(images_np)
    labels = torch.from_numpy(rng.permutation(np.arange(n_images) % n_new))  # every class has images
    bcfg = BackboneConfig(arch="r8", width=16, in_channels=1, image_size=32, embedding_dim=dim)
    hcfg = HeadConfig(type="arcface")
    old_model = freeze(build_backbone(bcfg))
    old_head = freeze(build_head(hcfg, dim, n_known))
    t0 = time.perf_counter()
    old_feats = extract(old_model, images_np, 512, progress=False)
    cache_s = time.perf_counter() - t0
    paragon_feats = extract(freeze(build_backbone(bcfg)), images_np, 512, progress=False)
    new_to_old = torch.full((n_new,), -1, dtype=torch.long)
    new_to_old[:n_known] = torch.randperm(n_known)
    ctx = CompatContext(old_embedding_dim=dim, new_embedding_dim=dim, num_new_classes=n_new,
                        new_to_old=new_to_old, train_labels=labels, old_train_feats=old_feats,
                        old_model=old_model, old_head=old_head, paragon_train_feats=paragon_feats)
    head = build_head(hcfg, dim, n_new)

    configs: dict[str, Config] = {}
    for name, (method, params) in METHODS.items():
        configs[name] = Config(method, params, False, bcfg, head, ctx, old_model)
        if name != "independent":
            configs[f"naive:{name}"] = Config(method, params, True, bcfg, head, ctx, old_model)
    gen = torch.Generator().manual_seed(1)
    order_rng = np.random.default_rng(2)
    names = list(configs)
    times: dict[str, list[float]] = {k: [] for k in names}
    for cfg in configs.values():  # warm-up
        cfg.step(images, torch.randperm(n_images, generator=gen)[:batch_size])
    for _ in range(cycles):
        idx = torch.randperm(n_images, generator=gen)[:batch_size]
        for i in order_rng.permutation(len(names)):
            t = time.perf_counter()
            configs[names[i]].step(images, idx)
            times[names[i]].append(time.perf_counter() - t)
    ms = {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}
    paired = {k: round(statistics.median(a / b for a, b in zip(v, times["independent"], strict=True)), 3)
              for k, v in times.items()}
    ratio = {k: v for k, v in paired.items() if not k.startswith("naive:")}
    naive_ratio = {k[6:]: v for k, v in paired.items() if k.startswith("naive:")}
    print(json.dumps({
        "benchmark": "train_step", "small": args.small, "threads": torch.get_num_threads(),
        "arch": "r8", "width": 16, "image": "1x32x32", "batch": batch_size, "embedding_dim": dim,
        "head": "arcface", "new_classes": n_new, "old_classes": n_known,
        "steps_timed_per_config": cycles, "old_feature_cache_s": round(cache_s, 2),
        "ms_per_step": ms, "ratio_cached": ratio, "ratio_naive": naive_ratio,
        "goal_cached_le_1.05": all(v <= 1.05 for v in ratio.values()),
    }))


if __name__ == "__main__":
    main()
