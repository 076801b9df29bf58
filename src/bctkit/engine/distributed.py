"""Several processes (torchrun): the process group, each rank's share of the work, and the collectives
training, the old-feature cache and extraction use.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`init_from_env` joins the process
group: nccl when the run uses CUDA, gloo otherwise. Without it every helper here is the identity of
one process, so library code calls them unconditionally and one code path serves both.

The work split follows one rule: every rank knows the whole global order (the seeded permutation of
an epoch, the rows of an extraction) and takes a contiguous share of it, rank after rank, so the
global batch of a step is the concatenation of the ranks' local batches in rank order, exactly the
batch one process would see.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from bctkit.errors import ConfigError

__all__ = [
    "all_gather_rows", "all_reduce_with_grad", "barrier", "broadcast_object", "close_process_group",
    "gather_rows", "gather_with_grad", "init_from_env", "is_distributed", "is_main", "local_rank",
    "max_across", "mean_across", "rank", "rank0_first", "share", "sum_across", "world_size",
]


def is_distributed() -> bool:
    """Whether a process group of more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0, the one process that writes files and shows progress."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_world() -> int:
    """The world size torchrun launched this process with (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init_from_env(device: torch.device, timeout_s: float = 1800.0) -> bool:
    """Join torchrun's process group when launched with more than one process; True if joined (or
    already joined). nccl for CUDA devices, gloo otherwise."""
    if launched_world() <= 1:
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return True


def close_process_group() -> None:
    """Leave the process group after a successful run (every rank reaches this). Objects that still
    hold the group (a DistributedDataParallel wrapper's reducer, kept by a reference cycle) are
    collected first, so that the group's threads are joined here and not during the interpreter's
    exit, where a rank could abort ('terminate called without an active exception')."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def rank0_first() -> Iterator[None]:
    """Rank 0 runs the block first (filling caches on disk); the other ranks run it after, reading them."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def share(n: int, of_rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, end) of this rank's contiguous share of n items (shares differ by at most one)."""
    w = world_size() if world is None else world
    r = rank() if of_rank is None else of_rank
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def mean_across(values: Sequence[float], device: torch.device | None = None) -> list[float]:
    """Each value averaged over the ranks (as given in one process)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device or _collective_device())
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def sum_across(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (no gradient)."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def max_across(value: int) -> int:
    """The largest of the ranks' values."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a decision or a file name; JSON-like values only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _collective_device() -> torch.device:
    """Where collective tensors live: the current CUDA device for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    if len(t) == rows:
        return t.contiguous()
    pad = t.new_zeros((rows - len(t), *t.shape[1:]))
    return torch.cat([t, pad])


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (shares of unequal length allowed), concatenated in rank order, on every rank."""
    if not is_distributed():
        return t
    dev = _collective_device()
    local = t.detach().to(dev)
    counts = torch.tensor([len(local)], device=dev)
    sizes = [torch.zeros_like(counts) for _ in range(world_size())]
    dist.all_gather(sizes, counts)
    rows = [int(s) for s in sizes]
    parts = [local.new_empty((max(rows), *local.shape[1:])) for _ in rows]
    dist.all_gather(parts, _padded(local, max(rows)))
    return torch.cat([p[:k] for p, k in zip(parts, rows, strict=True)]).to(t.device)


def gather_rows(t: torch.Tensor) -> torch.Tensor | None:
    """Every rank's rows concatenated in rank order on rank 0 (None on the other ranks)."""
    if not is_distributed():
        return t
    full = all_gather_rows(t)
    return full if is_main() else None


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward gives each rank the gradient of the SUM of all ranks' losses with
    respect to its own rows (an all_reduce of the incoming gradient, then this rank's slice), times
    ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.detach().contiguous())
        ctx.rows, ctx.scale = len(x), scale
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = rank() * ctx.rows
        local = grad[start : start + ctx.rows]
        return (local * ctx.scale if ctx.scale != 1.0 else local), None


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks whose backward is the sum over ranks of the incoming gradients (every rank's
    loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the ranks, differentiably (an in-batch statistic of the global batch)."""
    if not is_distributed():
        return x
    return _AllReduceWithGrad.apply(x)


def gather_with_grad(x: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
    """The global batch of a batch-coupled term (equal local shares, rank order): other ranks' rows as
    values, this rank's rows keeping their graph; gradients from every rank's loss reach the rows
    they came from. With each rank's loss the mean over ITS anchors and DDP averaging gradients, the
    update equals one process's on the whole batch. A loss that every rank computes over the whole
    global batch (the sharded classifier) passes ``grad_scale`` = world size, undoing DDP's average."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x, float(grad_scale))
