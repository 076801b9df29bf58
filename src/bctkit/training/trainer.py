"""The training loop shared by every model: old, paragon and each compatibility method."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bctkit.data.imageset import ImageSet, to_float
from bctkit.errors import TrainingError
from bctkit.losses.base import CompatBatch, CompatContext, CompatibilityTerm
from bctkit.models.backbones import BackboneConfig, build_backbone
from bctkit.models.heads import Head, HeadConfig, build_head
from bctkit.training.checkpoint import load_checkpoint, save_checkpoint
from bctkit.training.config import AugmentConfig, OptimizerConfig, TrainConfig
from bctkit.training.schedules import lr_factor


@dataclass
class TrainResult:
    backbone: torch.nn.Module
    head: Head
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int = 0


def make_optimizer(cfg: OptimizerConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )
    return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Seeded train-time augmentation (random horizontal flip, random crop from a padded image)."""
    if cfg.hflip:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if cfg.crop_pad:
        p, (n, _, h, w) = cfg.crop_pad, x.shape
        padded = F.pad(x, (p, p, p, p), mode="replicate")
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * p)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
        x = x.gather(3, cols)
    return x


def train_model(
    train_set: ImageSet,
    backbone_cfg: BackboneConfig,
    head_cfg: HeadConfig,
    cfg: TrainConfig,
    *,
    term: CompatibilityTerm | None = None,
    ctx: CompatContext | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    run_id: str = "",
    desc: str = "train",
    progress: bool = True,
    stop_after_epoch: int | None = None,
    init_seed: int | None = None,
) -> TrainResult:
    """Train backbone + head (+ compatibility term) on ``train_set`` (labels 0..C-1).

    A checkpoint is written atomically after every epoch; with ``resume`` an existing checkpoint of
    the same ``run_id`` is continued, giving the same weights as an uninterrupted run.
    ``stop_after_epoch`` ends early (as an interruption would), for tests and staged runs.
    ``init_seed`` (default ``cfg.seed``) seeds initialisation and dropout; batch order and
    augmentation always follow ``cfg.seed``.
    """
    torch.manual_seed(cfg.seed if init_seed is None else init_seed)
    num_classes = int(train_set.labels.max()) + 1
    backbone = build_backbone(backbone_cfg)
    head = build_head(head_cfg, backbone_cfg.embedding_dim, num_classes)
    modules: dict[str, torch.nn.Module] = {"backbone": backbone, "head": head}
    if term is not None:
        if ctx is None:
            raise ValueError("a compatibility term needs a CompatContext")
        term.setup(ctx)
        modules["term"] = term
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = make_optimizer(cfg.optimizer, params)

    history: list[dict[str, Any]] = []
    start = 0
    if resume and checkpoint is not None and checkpoint.exists():
        meta = load_checkpoint(checkpoint, modules, opt)
        if meta.get("run_id") != run_id:
            raise TrainingError(
                f"{checkpoint}: checkpoint belongs to another configuration; delete it or drop --resume"
            )
        start, history = int(meta["epoch"]), list(meta["history"])

    images = torch.from_numpy(train_set.images)
    labels = torch.from_numpy(train_set.labels)
    n, bs = len(labels), cfg.batch_size
    steps = max(1, n // bs)
    old_labels = ctx.new_to_old[labels] if ctx is not None else None
    last = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    for epoch in range(start, last):
        if term is not None:
            term.on_epoch_start(epoch, backbone)
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        backbone.train()
        head.train()
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        bar = tqdm(range(steps), desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False, dynamic_ncols=True)
        for it in bar:
            step = epoch * steps + it
            lr = cfg.optimizer.lr * lr_factor(cfg.schedule, step, steps, cfg.epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = perm[it * bs : (it + 1) * bs] if n >= bs else perm
            x = augment(to_float(images[idx]), cfg.augment, gen)
            y = labels[idx]
            base_feats, feats = backbone.forward_train(x)
            parts: dict[str, float] = {}
            loss: torch.Tensor
            if term is not None and ctx is not None:
                batch = CompatBatch(
                    new_feats=feats, base_feats=base_feats, labels=y, index=idx, epoch=epoch, step=step,
                    old_feats=None if ctx.old_train_feats is None else ctx.old_train_feats[idx],
                    paragon_feats=None if ctx.paragon_train_feats is None else ctx.paragon_train_feats[idx],
                    old_labels=None if old_labels is None else old_labels[idx],
                )
                base = head(term.mix(base_feats, batch), y)
                out = term(batch)
                loss = base + out.loss
                parts = out.parts
            else:
                base = head(base_feats, y)
                loss = base
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"{desc}: loss became {float(loss.detach())} at epoch {epoch + 1} step {it + 1}; "
                    "lower the learning rate or enable grad_clip"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            loss_value = float(loss.detach())
            for k, v in {"loss": loss_value, "base": float(base.detach()), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
            done = (it + 1) * len(idx)
            bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{done / (time.perf_counter() - t0):.0f}")
        elapsed = time.perf_counter() - t0
        record = {k: v / steps for k, v in sums.items()}
        record.update(epoch=epoch + 1, lr=lr, seconds=round(elapsed, 3),
                      images_per_s=round(steps * min(bs, n) / elapsed, 1))
        history.append(record)
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} "
                       f"({record['images_per_s']:.0f} img/s)")
        if checkpoint is not None:
            save_checkpoint(checkpoint, modules, opt,
                            {"run_id": run_id, "epoch": epoch + 1, "history": history,
                             "backbone": backbone_cfg.model_dump(mode="json")})
    backbone.eval()
    head.eval()
    return TrainResult(backbone, head, history, resumed_from_epoch=start)


