"""Training an old-to-new transformation h on (old feature, new feature) pairs of the training images.

FCT's objective is the squared distance between h(old [, side]) and the new model's embedding. With
FastFill's uncertainty h also outputs s = log sigma^2 per item and is trained by the Gaussian
negative log-likelihood of the new embedding, 0.5 * (exp(-s) * ||new - h||^2 + d * s): for a fixed
error the best s is log(||new - h||^2 / d), so sigma^2 learns each item's expected squared error
per coordinate, and items h serves badly weigh less in the fit of the mean. Targets are the new
model's embeddings scaled to unit length (retrieval compares directions); inputs are the stored old
vectors as they are (their length carries information: the backfill's ``benefit`` order reads it).

Nothing here reads an image: the features come from the run's caches. Training is seeded, saves a
checkpoint (weights, optimiser, RNG) after every epoch and resumes from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from bctkit.errors import DataError
from bctkit.models.transformation import Transformation, TransformationConfig
from bctkit.training.checkpoint import checkpoint_run_id, load_checkpoint, save_checkpoint
from bctkit.training.config import ScheduleConfig
from bctkit.training.schedules import lr_factor


class TransformTrainConfig(BaseModel):
    """How h is trained (FCT's defaults: Adam, lr 5e-4, weight decay 3.05e-5, batch 1024, cosine
    schedule with 5 warm-up epochs; FCT trains 80 epochs)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(80, ge=1)
    batch_size: int = Field(1024, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(3.0517578125e-5, ge=0)
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(name="cosine", warmup_epochs=5))
    seed: int = 0


def transformation_loss(pred: torch.Tensor, log_var: torch.Tensor | None, target: torch.Tensor
                        ) -> torch.Tensor:
    """Mean over the batch of FCT's ||target - pred||^2, or with ``log_var`` (FastFill) of
    0.5 * (exp(-s) * ||target - pred||^2 + d * s)."""
    sq = (target - pred).pow(2).sum(1)
    if log_var is None:
        return sq.mean()
    return (0.5 * (torch.exp(-log_var) * sq + target.shape[1] * log_var)).mean()


@dataclass
class TransformTrainResult:
    net: Transformation
    history: list[dict[str, float]]


def _check(name: str, t: torch.Tensor, rows: int, what: str) -> None:
    if t.ndim != 2 or t.shape[0] != rows:
        raise DataError(f"transformation training: {name} must be [{rows}, d] ({what}), got {list(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise DataError(f"transformation training: {name} holds NaN or Inf ({what})")


def train_transformation(
    old: torch.Tensor, new: torch.Tensor, config: TransformationConfig, train: TransformTrainConfig,
    side: torch.Tensor | None = None, device: torch.device | str = "cpu", checkpoint: Path | None = None,
    run_id: str = "", progress: bool = False, desc: str = "transform",
    log: Callable[[str], None] | None = None,
) -> TransformTrainResult:
    """Train h from the old features ``old`` [N, d_o] (and ``side`` [N, d_s]) to the new features
    ``new`` [N, d_n] of the same N images. ``checkpoint``: written after every epoch and resumed
    from when it holds ``run_id``'s training."""
    n = old.shape[0]
    if n < 2:
        raise DataError(f"transformation training: needs at least 2 training images, got {n}")
    _check("old features", old, n, f"{config.old_dim}-d old embeddings")
    _check("new features", new, n, f"{config.new_dim}-d new embeddings")
    if old.shape[1] != config.old_dim or new.shape[1] != config.new_dim:
        raise DataError(f"transformation training: features are {old.shape[1]}-d old, {new.shape[1]}-d new; "
                        f"the transformation maps {config.old_dim}-d to {config.new_dim}-d")
    if config.side_dim:
        if side is None:
            raise DataError("transformation training: side information configured but none given")
        _check("side information", side, n, f"{config.side_dim}-d side vectors")
    dev = torch.device(device)
    x = old.to(torch.float32)
    y = torch.nn.functional.normalize(new.to(torch.float32), dim=1)
    s = None if side is None else side.to(torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        net = Transformation(config).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    batch = min(train.batch_size, n)
    steps = n // batch  # full batches only: BatchNorm needs more than one row, every epoch alike
    history: list[dict[str, float]] = []
    start = 0
    if checkpoint is not None and checkpoint.is_file() and checkpoint_run_id(checkpoint) == run_id:
        meta = load_checkpoint(checkpoint, {"net": net}, opt)
        start, history = int(meta["epoch"]), list(meta["history"])
        if log:
            log(f"[{desc}] resuming from epoch {start}")
    gen = torch.Generator().manual_seed(train.seed)
    for _ in range(start):  # the permutations of the epochs already done
        torch.randperm(n, generator=gen)
    bar = tqdm(range(start, train.epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        net.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for b in range(steps):
            idx = perm[b * batch:(b + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = train.lr * lr_factor(train.schedule, epoch * steps + b, steps, train.epochs)
            pred, log_var = net(x[idx].to(dev), None if s is None else s[idx].to(dev))
            loss = transformation_loss(pred, log_var, y[idx].to(dev))
            if not bool(torch.isfinite(loss.detach())):
                raise DataError(f"transformation training: loss became {float(loss.detach())} at epoch "
                                f"{epoch + 1}; "
                                "lower transforms[].train.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        history.append({"epoch": epoch + 1, "loss": total / steps})
        bar.set_postfix(loss=f"{total / steps:.4f}")
        if checkpoint is not None:
            save_checkpoint(checkpoint, {"net": net}, opt, {"run_id": run_id, "epoch": epoch + 1,
                                                            "history": history})
    net.eval()
    net.requires_grad_(False)
    return TransformTrainResult(net.cpu(), history)


def evaluate_loss(net: Transformation, old: torch.Tensor, new: torch.Tensor,
                  side: torch.Tensor | None = None) -> float:
    """The training objective of a trained h on given features (eval mode)."""
    with torch.no_grad():
        pred, log_var = net.eval()(old.to(torch.float32), None if side is None else side.to(torch.float32))
        return float(transformation_loss(pred, log_var, torch.nn.functional.normalize(new.float(), dim=1)))


def describe(history: list[dict[str, Any]]) -> str:
    """``first -> last`` loss of a training history, for the log."""
    return f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}" if history else "no epochs"
