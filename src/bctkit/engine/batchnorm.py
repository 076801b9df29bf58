"""Batch normalisation over the global batch when training with several processes.

One process normalises a training batch by that batch's mean and variance. With the batch split over
ranks, plain BatchNorm would use each rank's share instead, so the losses, gradients and running
statistics would differ from one process's. :func:`sync_batchnorm` makes every BatchNorm layer of a
model use the statistics of the whole global batch (one differentiable all-reduce per layer in the
forward pass and one in the backward pass). It works with gloo on CPU and with nccl on
GPUs (torch's SyncBatchNorm refuses CPU modules). The layers keep their parameters and buffers, so
state-dict names, checkpoints and saved models are unchanged; with one process, or in eval mode,
they are plain BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from bctkit.engine.distributed import all_reduce_with_grad, is_distributed

__all__ = ["GlobalBatchNorm1d", "GlobalBatchNorm2d", "sync_batchnorm"]


def _global_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode batch norm with the global batch's statistics (computed in float32).

    One differentiable all-reduce per layer: the sums of (x - s) and (x - s)^2 and the count, with
    the shift s = the running mean (the same on every rank), which keeps E[(x-s)^2] - E[x-s]^2 free
    of cancellation once the running mean follows the data."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    c = x.shape[1]
    shift = bn.running_mean.detach().float() if bn.running_mean is not None else x.new_zeros(c).float()
    d = x.float() - shift.view(shape)
    count = d.new_tensor([float(x.numel() // c)])
    sums = all_reduce_with_grad(torch.cat([d.sum(dims), d.square().sum(dims), count]))
    n = float(sums[-1].detach())
    mean_d = sums[:c] / n
    var = (sums[c : 2 * c] / n - mean_d.square()).clamp_min(0.0)
    mean = mean_d + shift
    y = (d - mean_d.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1.0, 1.0)), alpha=factor)
    return y.to(x.dtype)


class _GlobalStatistics:
    """Training forward over the global batch under several processes, BatchNorm's own otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and is_distributed():  # type: ignore[attr-defined]
            self._check_input_dim(x)  # type: ignore[attr-defined]
            return _global_forward(self, x)  # type: ignore[arg-type]
        return super().forward(x)  # type: ignore[misc]


class GlobalBatchNorm1d(_GlobalStatistics, nn.BatchNorm1d):
    """BatchNorm1d over the global batch (see module docstring)."""


class GlobalBatchNorm2d(_GlobalStatistics, nn.BatchNorm2d):
    """BatchNorm2d over the global batch (see module docstring)."""


_GLOBAL: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d,
}


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Make every BatchNorm1d/2d layer of ``model`` normalise by the global batch, in place (same
    parameters and buffers); returns ``model``."""
    for m in model.modules():
        cls = _GLOBAL.get(type(m))
        if cls is not None:
            m.__class__ = cls
    return model
