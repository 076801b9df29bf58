"""Where a run computes: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked before any work."""

from __future__ import annotations

import re

import torch

from bctkit.errors import ConfigError

__all__ = ["resolve_device"]

_SPEC = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def resolve_device(spec: str, local_rank: int = 0, world: int = 1,
                   field: str = "train.device") -> torch.device:
    """The torch device for ``spec``. ``auto`` is CUDA when present (the process's ``local_rank``-th
    GPU under torchrun), else the CPU. Under torchrun on CUDA each process takes the GPU of its local
    rank, so a fixed ``cuda:N`` with several processes is refused (they would share one GPU).
    ``field`` names the option in errors."""
    m = _SPEC.match(spec.strip().lower())
    if m is None:
        raise ConfigError(f"{field}={spec!r}; expected auto, cpu, cuda, cuda:N or mps")
    kind, index = m.group(1), m.group(2)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if index is not None and kind != "cuda":
        raise ConfigError(f"{field}={spec!r}; only cuda takes a device index")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"{field}=mps but this machine has no usable MPS device")
        if world > 1:
            raise ConfigError(f"{field}=mps does not support several processes (torchrun)")
        return torch.device("mps")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"{field}={spec!r} but this machine has no usable CUDA device "
                          f"(use {field}=auto or cpu)")
    if index is not None and world > 1:
        raise ConfigError(f"{field}={spec!r} with {world} processes: each process takes the GPU of "
                          f"its LOCAL_RANK; use {field}=cuda or auto")
    n = int(index) if index is not None else local_rank
    if n >= count:
        raise ConfigError(f"{field} needs GPU {n} but this machine has {count} "
                          f"(CUDA_VISIBLE_DEVICES={torch.cuda.device_count()} visible)")
    return torch.device("cuda", n)
