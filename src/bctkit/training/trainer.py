"""The training loop shared by every model: old, paragon and each compatibility method."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bctkit.data.sources.base import DataSource
from bctkit.engine.batchnorm import sync_batchnorm
from bctkit.engine.compute import Engine
from bctkit.engine.distributed import mean_across, sum_across
from bctkit.engine.loader import Feed, as_feed, epoch_batches
from bctkit.engine.precision import Precision
from bctkit.errors import TrainingError
from bctkit.losses.base import CompatBatch, CompatContext, CompatibilityTerm
from bctkit.models.config import BackboneConfig
from bctkit.models.factory import build_backbone
from bctkit.models.heads import Head, HeadConfig, build_head
from bctkit.models.sharded_head import ShardedHead, shard_rows
from bctkit.models.sharded_head import gather_rows as gather_shards
from bctkit.training.checkpoint import load_checkpoint, save_checkpoint
from bctkit.training.config import OptimizerConfig, TrainConfig
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


class _TrainStep(nn.Module):
    """The trainable modules as one (backbone, head, compatibility term), so data parallelism wraps
    exactly them and never the frozen old model. The backbone runs under the precision's autocast;
    its features enter the head and the term in float32."""

    def __init__(self, backbone: nn.Module, head: Head | None, term: CompatibilityTerm | None,
                 precision: Precision) -> None:
        super().__init__()
        self.backbone, self.head, self.term = backbone, head, term
        self.precision = precision

    def forward(self, x: torch.Tensor, y: torch.Tensor, fields: dict[str, Any]
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict[str, float]]:
        """(features the base head classifies, base loss or None when the head is sharded and
        applied outside, the term's loss or None, the term's logged parts)."""
        with self.precision.autocast():
            base_feats, feats = self.backbone.forward_train(x)
        base_feats, feats = base_feats.float(), feats.float()
        if self.term is None:
            return base_feats, None if self.head is None else self.head(base_feats, y), None, {}
        cbatch = CompatBatch(new_feats=feats, base_feats=base_feats, labels=y, **fields)
        mixed = self.term.mix(base_feats, cbatch)
        base = None if self.head is None else self.head(mixed, y)
        out = self.term(cbatch)
        return mixed, base, out.loss, out.parts


def _step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout seed of one step on one rank (several processes or an accelerator: the global RNG's
    state is not what a checkpoint restores there, so each step is seeded instead)."""
    state = np.random.SeedSequence([seed, step, rank, 0x64726F70]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 32) | int(state[1])


def train_model(
    train_set: Feed | DataSource | np.ndarray,
    backbone_cfg: BackboneConfig,
    head_cfg: HeadConfig,
    cfg: TrainConfig,
    *,
    term: CompatibilityTerm | None = None,
    ctx: CompatContext | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    run_id: str = "",
    extends: str | None = None,
    desc: str = "train",
    progress: bool = True,
    stop_after_epoch: int | None = None,
    stop_after_step: int | None = None,
    init_seed: int | None = None,
    engine: Engine | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train backbone + head (+ compatibility term) on ``train_set`` (labels 0..C-1): a Feed (source,
    preprocessing, loader workers) or a source read with the default preprocessing.

    A checkpoint is written atomically after every epoch (and every ``cfg.checkpoint_every`` steps
    inside one); with ``resume`` an existing checkpoint of the same ``run_id`` is continued, from
    the step it was written at, giving the same weights as an uninterrupted run. ``extends``: the
    run id of a finished run with fewer epochs and otherwise this configuration, whose final
    checkpoint ``resume`` may also continue, to ``cfg.epochs`` (the schedule is this config's:
    :func:`lr_factor` depends only on the step and the total epochs).
    ``stop_after_epoch`` / ``stop_after_step`` (a global step count) end early, as an interruption
    would, for tests and staged runs. ``init_seed`` (default ``cfg.seed``) seeds initialisation and
    dropout; batch order and augmentation always follow ``cfg.seed``.
    """
    eng = Engine.create(cfg.device, cfg.precision) if engine is None else engine.with_precision(cfg.precision)
    dev, prec = eng.device, eng.precision
    progress = progress and eng.is_main
    feed = as_feed(train_set)
    labels_np = feed.source.labels
    if len(labels_np) == 0:
        raise TrainingError(f"{desc}: no training images")
    torch.manual_seed(cfg.seed if init_seed is None else init_seed)
    num_classes = int(labels_np.max()) + 1
    backbone = build_backbone(backbone_cfg)
    pfc = cfg.partial_fc
    sharded = pfc.sample_rate < 1 or (pfc.shard and eng.world > 1)
    head: Head | ShardedHead = (
        ShardedHead(head_cfg, backbone_cfg.embedding_dim, num_classes, pfc.sample_rate, cfg.seed) if sharded
        else build_head(head_cfg, backbone_cfg.embedding_dim, num_classes))
    modules: dict[str, torch.nn.Module] = {"backbone": backbone, "head": head}
    if term is not None:
        if ctx is None:
            raise ValueError("a compatibility term needs a CompatContext")
        term.setup(ctx)
        modules["term"] = term
    for module in modules.values():
        module.to(dev)
    if eng.world > 1 and cfg.batchnorm == "global":
        sync_batchnorm(backbone)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = make_optimizer(cfg.optimizer, params)
    seed_steps = eng.world > 1 or dev.type != "cpu"

    history: list[dict[str, Any]] = []
    start, start_step, sums, spent = 0, 0, {}, 0.0
    if resume and checkpoint is not None and checkpoint.exists():
        meta = load_checkpoint(checkpoint, modules, opt)
        prec.load_state_dict(meta.get("scaler") or {})
        if isinstance(head, ShardedHead):
            _shard_state(opt, head)
        if meta.get("run_id") != run_id and not (
                extends is not None and meta.get("run_id") == extends
                and not meta.get("step") and int(meta["epoch"]) < cfg.epochs):
            raise TrainingError(
                f"{checkpoint}: checkpoint belongs to another configuration; delete it or drop --resume"
            )
        start, history = int(meta["epoch"]), list(meta["history"])
        start_step, sums = int(meta.get("step", 0)), dict(meta.get("sums", {}))
        spent = float(meta.get("spent", 0))
        where = f"epoch {start + 1} step {start_step + 1}" if start_step else f"epoch {start + 1}"
        say = log if log is not None else (tqdm.write if progress else None)
        if say is not None and eng.is_main:
            say(f"[{desc}] resuming from {checkpoint} at {where} of {cfg.epochs}")

    def save(epoch: int, step: int) -> None:
        if checkpoint is None:
            return
        saved, opt_state = modules, opt.state_dict()
        if isinstance(head, ShardedHead):  # one matrix, whatever the number of processes (collective)
            saved, opt_state = {**modules, "head": head.to_head()}, _full_state(opt, head)
        if eng.is_main:
            save_checkpoint(checkpoint, saved, opt_state,
                            {"run_id": run_id, "epoch": epoch, "step": step, "sums": sums, "spent": spent,
                             "history": history, "backbone": backbone_cfg.model_dump(mode="json"),
                             "scaler": prec.state_dict()})

    model = eng.wrap(_TrainStep(backbone, None if isinstance(head, ShardedHead) else head, term, prec))

    n, bs = len(labels_np), cfg.batch_size
    steps = max(1, n // bs)
    per_step = min(bs, n)
    old_labels = ctx.new_to_old.cpu()[torch.from_numpy(labels_np)] if ctx is not None else None
    last = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    lr = cfg.base_lr
    for epoch in range(start, last):
        first = start_step if epoch == start else 0
        if term is not None and first == 0:
            term.on_epoch_start(epoch, backbone)
        backbone.train()
        head.train()
        batches = epoch_batches(n, bs, cfg.seed, epoch, first)
        local = [eng.local_batch(b) for b in batches]
        t0 = t_bar = time.perf_counter()
        bar = tqdm(total=steps, initial=first, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False, dynamic_ncols=True)
        reads = feed.read(local, cfg.augment.hflip, cfg.augment.crop_pad, cfg.seed)
        for batch, mine, (images, y, idx) in zip(batches, local, reads, strict=True):
            it = batch.step
            step = epoch * steps + it
            lr = cfg.base_lr * lr_factor(cfg.schedule, step, steps, cfg.epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            if seed_steps:
                torch.manual_seed(_step_seed(cfg.seed, step, eng.rank))
            x = feed.preprocess.normalize(images.to(dev, non_blocking=True))
            y = y.to(dev, non_blocking=True)
            fields: dict[str, Any] = {}
            if term is not None and ctx is not None:
                fields = dict(
                    index=idx, epoch=epoch, step=step, offset=mine.offset,
                    global_index=torch.from_numpy(batch.indices),
                    old_feats=_on(ctx.old_train_feats, idx, dev),
                    paragon_feats=_on(ctx.paragon_train_feats, idx, dev),
                    old_labels=_on(old_labels, idx, dev),
                )
            mixed, base, extra, parts = model(x, y, fields)
            if base is None:
                base = head(mixed, y, step)
            loss = base if extra is None else base + extra
            values = dict(zip(["loss", "base", *parts],
                              mean_across([float(loss.detach()), float(base.detach()), *parts.values()]),
                              strict=True))
            if not math.isfinite(values["loss"]):
                raise TrainingError(
                    f"{desc}: loss became {values['loss']} at epoch {epoch + 1} step {it + 1}; "
                    "lower the learning rate or enable grad_clip"
                )
            opt.zero_grad(set_to_none=True)
            prec.backward(loss)
            if cfg.grad_clip is not None:
                prec.unscale(opt)
                if isinstance(head, ShardedHead):
                    _clip_sharded(params, head.weight, cfg.grad_clip)
                else:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            prec.step(opt)
            loss_value = values["loss"]
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            if on_step is not None:
                on_step(step, values)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}",
                            img_s=f"{(it + 1 - first) * per_step / (time.perf_counter() - t_bar):.0f}")
            if stop_after_step is not None and step + 1 >= stop_after_step:
                bar.close()
                return TrainResult(backbone, _replicated(head), history, resumed_from_epoch=start)
            if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < steps:
                spent += time.perf_counter() - t0  # an epoch's time excludes its checkpoint saves
                save(epoch, it + 1)
                t0 = time.perf_counter()
        bar.close()
        elapsed = spent + time.perf_counter() - t0
        record = {k: v / steps for k, v in sums.items()}
        record.update(epoch=epoch + 1, lr=lr, seconds=round(elapsed, 3),
                      images_per_s=round(steps * per_step / elapsed, 1))
        history.append(record)
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} "
                       f"({record['images_per_s']:.0f} img/s)")
        sums, spent = {}, 0.0
        save(epoch + 1, 0)
    backbone.eval()
    head.eval()
    return TrainResult(backbone, _replicated(head), history, resumed_from_epoch=start)


def _replicated(head: Head | ShardedHead) -> Head:
    """The head as one matrix (a sharded head is gathered: a collective call)."""
    return head.to_head().eval() if isinstance(head, ShardedHead) else head


def _clip_sharded(params: list[torch.nn.Parameter], shard: torch.nn.Parameter, max_norm: float) -> None:
    """clip_grad_norm_ with the norm of the whole model: the replicated gradients (equal on every
    rank) plus every rank's rows of the sharded class matrix."""
    replicated = [p.grad for p in params if p.grad is not None and p is not shard]
    sq = torch.stack([g.detach().float().square().sum() for g in replicated]).sum() if replicated else 0.0
    own = shard.grad.detach().float().square().sum() if shard.grad is not None else torch.zeros(())
    total = (sq + sum_across(own.to(shard.device))).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in [*replicated, shard.grad]:
        if g is not None:
            g.mul_(coef.to(g.device, g.dtype))


def _full_state(opt: torch.optim.Optimizer, head: ShardedHead) -> dict[str, Any]:
    """The optimiser's state dict with the sharded head's per-row state (momentum) gathered whole."""
    sd = opt.state_dict()
    pid = _param_id(opt, head.weight)
    state = dict(sd["state"].get(pid, {}))
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.shape == head.weight.shape:
            state[k] = gather_shards(v, head.num_classes)
    return {**sd, "state": {**sd["state"], pid: state}}


def _shard_state(opt: torch.optim.Optimizer, head: ShardedHead) -> None:
    """After loading a checkpoint's whole-matrix optimiser state: keep this rank's rows."""
    st = opt.state.get(head.weight, {})
    for k, v in list(st.items()):
        if isinstance(v, torch.Tensor) and v.ndim == 2 and v.shape[0] == head.num_classes:
            st[k] = shard_rows(v).clone()


def _param_id(opt: torch.optim.Optimizer, param: torch.nn.Parameter) -> int:
    """The index of ``param`` in the optimiser's state dict."""
    flat = [p for group in opt.param_groups for p in group["params"]]
    return next(i for i, p in enumerate(flat) if p is param)


def _on(t: torch.Tensor | None, idx: torch.Tensor, dev: torch.device) -> torch.Tensor | None:
    """Rows ``idx`` of a per-image tensor (cached features, labels) on the training device."""
    return None if t is None else t[idx].to(dev, non_blocking=True)
