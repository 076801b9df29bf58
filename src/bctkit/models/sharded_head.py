"""A cosine-margin head whose class matrix is split by rows across ranks (model-parallel "Partial FC").

With many classes the (num_classes, dim) matrix and its optimizer state dominate memory; each rank of the
default process group holds one contiguous block of rows. The loss is the exact softmax cross entropy of
the global batch: features are all-gathered, each rank scores its own classes, and the softmax
normaliser is assembled with three all-reduces. ``sample_rate < 1`` adds Partial FC negative-class
sampling. Only gloo-compatible collectives (all_gather, all_reduce) are used.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bctkit.engine.distributed import all_gather_rows, gather_with_grad, rank, share, world_size
from bctkit.errors import ConfigError, DataError
from bctkit.models.heads import ArcFaceHead, CosFaceHead, Head, HeadConfig, NormFaceHead, build_head

_MARGIN_HEADS = {"normface": NormFaceHead, "cosface": CosFaceHead, "arcface": ArcFaceHead}


def shard_bounds(num_classes: int, world: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) row blocks in rank order, sizes differing by at most 1: each rank's
    :func:`bctkit.engine.distributed.share` of the classes."""
    return [share(num_classes, r, world) for r in range(world)]


def gather_rows(t: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The full tensor of ``num_rows`` rows on every rank, from each rank's [start, end) row shard ``t``
    (the weight, an optimizer buffer of it)."""
    start, end = share(num_rows)
    if t.shape[0] != end - start:
        raise DataError(f"gather_rows: rank {rank()} holds {t.shape[0]} rows, expected {end - start}")
    return all_gather_rows(t.detach()).clone()


def shard_rows(full: torch.Tensor) -> torch.Tensor:
    """This rank's rows [start, end) of a full row-sharded tensor (e.g. to reload at another world size)."""
    start, end = share(full.shape[0])
    return full[start:end].clone()


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    """In-place all_reduce when a process group with more than one rank exists."""
    if world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross entropy over classes split across ranks, in float32.

    ``logits`` (B, k) are this rank's columns; ``target`` holds the local column of each sample's label,
    or -1 where another rank owns it. Backward is (softmax - onehot) / B on the local columns and needs
    no communication.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ctx.dtype = logits.dtype
        logits = logits.detach().float()
        rows = logits.shape[0]
        peak = logits.max(dim=1).values if logits.shape[1] else logits.new_full((rows,), -math.inf)
        _all_reduce(peak, dist.ReduceOp.MAX)
        exp = (logits - peak[:, None]).exp()
        denom = _all_reduce(exp.sum(dim=1), dist.ReduceOp.SUM)
        owned = target >= 0
        picked = logits.gather(1, target.clamp_min(0)[:, None]).squeeze(1) if logits.shape[1] else peak
        target_logit = _all_reduce(torch.where(owned, picked - peak, 0.0), dist.ReduceOp.SUM)
        ctx.save_for_backward(exp / denom[:, None], target)
        return (denom.log() - target_logit).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        prob, target = ctx.saved_tensors
        out = prob.clone()
        rows = (target >= 0).nonzero().squeeze(1)
        out[rows, target[rows]] -= 1.0
        return (out * (grad / prob.shape[0])).to(ctx.dtype), None


class ShardedHead(nn.Module):
    """A cosine-margin head (normface/cosface/arcface, same s, m and margin formulas as heads.py) whose
    (num_classes, dim) class matrix is split by rows across the ranks of the default torch.distributed
    process group (world 1 or no process group: it holds all rows and equals the replicated head).

    Keep this module out of DistributedDataParallel: its weight gradient is already the exact gradient of
    the global-batch loss for this rank's rows. The gradient returned to the local features is scaled by
    the world size W so that DDP's averaging of the backbone gradients yields dL/d(backbone) (see
    :func:`bctkit.engine.distributed.gather_with_grad`). Every rank must pass the same local batch size.
    """

    def __init__(
        self, cfg: HeadConfig, embedding_dim: int, num_classes: int, sample_rate: float = 1.0, seed: int = 0
    ) -> None:
        super().__init__()
        if cfg.type not in _MARGIN_HEADS:
            raise ConfigError(f"sharding needs a cosine-margin head (normface, cosface, arcface): {cfg.type}")
        if not 0.0 < sample_rate <= 1.0:
            raise ConfigError(f"ShardedHead sample_rate must be in (0, 1], got {sample_rate}")
        world, me = world_size(), rank()
        self.type = cfg.type
        self.s, self.m = (float(v) for v in cfg.resolved())
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.sample_rate, self.seed, self.rank = float(sample_rate), seed, me
        self.start, self.end = shard_bounds(num_classes, world)[me]
        full = torch.empty(num_classes, embedding_dim)
        nn.init.normal_(full, std=0.01)
        self.weight = nn.Parameter(full[self.start : self.end].clone())

    def margin(self, cos_target: torch.Tensor) -> torch.Tensor:
        """The target cosine after the margin: heads.py's own formula for this type (it reads only self.m)."""
        return _MARGIN_HEADS[self.type].margin(self, cos_target)

    def kept_classes(self, labels: torch.Tensor, step: int) -> torch.Tensor:
        """Sorted global ids of this rank's classes used at ``step`` for the global-batch ``labels``.

        All of the shard at sample_rate 1; otherwise every positive class of the shard plus random others
        up to ceil(sample_rate * shard size), from a generator seeded by (seed, step, rank).
        """
        size = self.end - self.start
        if self.sample_rate >= 1.0:
            return torch.arange(self.start, self.end, device=self.weight.device)
        labels = labels.detach().cpu()
        positive = torch.zeros(size, dtype=torch.bool)
        positive[labels[(labels >= self.start) & (labels < self.end)] - self.start] = True
        num_pos = int(positive.sum())
        keep = max(num_pos, math.ceil(self.sample_rate * size - 1e-9))
        mixed = ((self.seed * 1_000_003 + step) * 65_537 + self.rank) % (2**63)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(mixed))
        negatives = order[~positive[order]][: keep - num_pos]
        kept = torch.cat([positive.nonzero().squeeze(1), negatives]).sort().values
        return (kept + self.start).to(self.weight.device)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor, step: int = 0) -> torch.Tensor:
        """Cross entropy of the global batch (all ranks' local batches in rank order), equal on every rank."""
        if world_size() > 1:
            # Every rank's loss is the whole global batch's and each holds only its class shard's part of
            # d L / d feats: the gather sums the parts over ranks and scales by W, so that DDP's average
            # of the backbone gradients equals d L / d backbone.
            feats, labels = gather_with_grad(feats, grad_scale=world_size()), all_gather_rows(labels)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise DataError(f"ShardedHead: labels must lie in [0, {self.num_classes})")
        size = self.end - self.start
        owned = (labels >= self.start) & (labels < self.end)
        local = (labels - self.start).clamp(0, max(size - 1, 0))
        weight = self.weight
        if self.sample_rate < 1.0:
            kept = self.kept_classes(labels, step) - self.start
            weight = weight.index_select(0, kept)
            column = torch.full((size,), -1, dtype=torch.long, device=labels.device)
            column[kept] = torch.arange(kept.numel(), device=labels.device)
            local = column[local] if size else local
        target = torch.where(owned, local, -1)
        cos = F.linear(F.normalize(feats, dim=1), F.normalize(weight, dim=1)).clamp(-1.0, 1.0)
        rows = (target >= 0).nonzero().squeeze(1)
        cols = target[rows]
        cos = cos.index_put((rows, cols), self.margin(cos[rows, cols]))
        return _ShardedCrossEntropy.apply(self.s * cos, target)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        """A checkpoint holds the whole matrix (whatever the number of processes that wrote it):
        this rank loads its rows of it."""
        w = state_dict.get(prefix + "weight")
        if isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[0] == self.num_classes:
            state_dict[prefix + "weight"] = w[self.start : self.end]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def full_weight(self) -> torch.Tensor:
        """The whole (num_classes, dim) class matrix on every rank."""
        return gather_rows(self.weight, self.num_classes)

    def load_full_weight(self, full: torch.Tensor) -> None:
        """Copy this rank's rows of a full (num_classes, dim) matrix into the shard."""
        if tuple(full.shape) != (self.num_classes, self.embedding_dim):
            raise DataError(
                f"ShardedHead.load_full_weight: expected shape {(self.num_classes, self.embedding_dim)}, "
                f"got {tuple(full.shape)}"
            )
        with torch.no_grad():
            self.weight.copy_(full[self.start : self.end])

    def to_head(self) -> Head:
        """A replicated heads.Head of the same type, s and m holding the full matrix (e.g. to save it)."""
        full = self.full_weight()
        with torch.random.fork_rng(devices=[]):
            cfg = HeadConfig(type=self.type, s=self.s, m=self.m)
            head = build_head(cfg, self.embedding_dim, self.num_classes)
        with torch.no_grad():
            head.weight.copy_(full)
        return head.to(self.weight.device)
