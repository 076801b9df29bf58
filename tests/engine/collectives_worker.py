"""Run under ``torchrun --nproc_per_node=2``: checks the differentiable collectives against one
process's computation on the whole batch, which every rank also does locally. Writes
``OUT/collectives-<rank>.json`` with the largest differences found."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bctkit.engine.batchnorm import sync_batchnorm
from bctkit.engine.distributed import gather_with_grad, init_from_env, rank, world_size


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def average_grad(t: torch.Tensor) -> torch.Tensor:
    """What DDP does to a replicated parameter's gradient."""
    g = t.clone()
    dist.all_reduce(g)
    return g / world_size()


def main() -> None:
    torch.set_num_threads(1)
    init_from_env(torch.device("cpu"))
    w, r = world_size(), rank()
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    weights = torch.randn(8, 3, 4, 4)
    rows = slice(r * 8 // w, (r + 1) * 8 // w)
    out: dict[str, float] = {}

    # BatchNorm over the global batch vs nn.BatchNorm2d on the whole batch
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    bn = sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))[0]
    bn.load_state_dict(ref.state_dict())
    xr = x.clone().requires_grad_(True)
    ((ref(xr) * weights).sum((1, 2, 3)).mean()).backward()
    xl = x[rows].clone().requires_grad_(True)
    y = bn(xl)
    (y * weights[rows]).sum((1, 2, 3)).mean().backward()
    expected = F.batch_norm(x, None, None, ref.weight.detach(), ref.bias.detach(), True)
    out["bn_output"] = diff(y.detach(), expected[rows])
    out["bn_input_grad"] = diff(xl.grad, w * xr.grad[rows])
    out["bn_weight_grad"] = diff(average_grad(bn.weight.grad), ref.weight.grad)
    out["bn_bias_grad"] = diff(average_grad(bn.bias.grad), ref.bias.grad)
    out["bn_running_mean"] = diff(bn.running_mean, ref.running_mean)
    out["bn_running_var"] = diff(bn.running_var, ref.running_var)

    # gather_with_grad: in-batch InfoNCE over new features (anchors local, candidates global)
    torch.manual_seed(1)
    lin = nn.Linear(6, 5)
    inputs = torch.randn(8, 6)

    def info_nce(anchors: torch.Tensor, cands: torch.Tensor, offset: int) -> torch.Tensor:
        sim = F.normalize(anchors, dim=1) @ F.normalize(cands, dim=1).T / 0.1
        return F.cross_entropy(sim, torch.arange(len(anchors)) + offset)

    full = lin(inputs)
    info_nce(full, full, 0).backward()
    ref_grad = lin.weight.grad.clone()
    lin.zero_grad()
    local = lin(inputs[rows])
    info_nce(local, gather_with_grad(local), rows.start).backward()
    out["gather_weight_grad"] = diff(average_grad(lin.weight.grad), ref_grad)
    out["gather_grad_scale"] = float(ref_grad.abs().max())
    Path(sys.argv[1], f"collectives-{r}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
