"""Training checkpoints: module weights, optimiser state and RNG state in one safetensors file,
with JSON metadata in its header (and a readable copy beside it). Written atomically.

The header also holds a CRC-32 of every tensor's bytes: safetensors checks only the header, so a
flipped bit in the tensors would otherwise be trained on (and end as a NaN loss much later).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from bctkit.errors import FileFormatError
from bctkit.storage import META_KEY, load_tensors, save_tensors, write_json

CHECKSUM_KEY = "checksums"


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes as stored (row-major, native byte order), for any dtype."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy().data) if flat.numel() else 0


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, val in state.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = val
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = val
    for pid, extra in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer | dict[str, Any],
    meta: dict[str, Any],
) -> None:
    """Save module weights (prefixed by their key), optimiser state (the optimiser or its state
    dict) and torch RNG state, with a CRC-32 of every tensor."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"{prefix}.{k}"] = v
    opt_tensors, opt_meta = _flatten_optimizer(opt if isinstance(opt, dict) else opt.state_dict())
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    checksums = {"algorithm": "crc32", "tensors": {k: tensor_crc32(v) for k, v in tensors.items()}}
    full = {**meta, "optimizer": opt_meta, CHECKSUM_KEY: checksums}
    save_tensors(path, tensors, full)
    write_json(path.with_suffix(".json"), meta)


def load_checkpoint(
    path: Path, modules: dict[str, nn.Module], opt: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns its metadata. Raises FileFormatError when a
    tensor's bytes do not match their checksum (checkpoints written before checksums load unchecked)."""
    tensors, meta = load_tensors(path)
    _verify(path, tensors, meta.pop(CHECKSUM_KEY, None))
    try:
        for prefix, module in modules.items():
            sub = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            module.load_state_dict(sub)
        opt.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise FileFormatError(f"{path}: checkpoint does not match this model ({exc})") from None
    return meta


def _verify(path: Path, tensors: dict[str, torch.Tensor], checksums: Any) -> None:
    """Check every tensor against the checksums written with it (None: an older checkpoint)."""
    if checksums is None:
        return
    try:
        expected = checksums["tensors"]
        if checksums["algorithm"] != "crc32" or set(expected) != set(tensors):
            raise ValueError
        bad = next((k for k in sorted(tensors) if tensor_crc32(tensors[k]) != int(expected[k])), None)
    except (KeyError, TypeError, ValueError):
        raise FileFormatError(f"{path}: checkpoint is corrupt (checksum table does not match its "
                              "tensors)") from None
    if bad is not None:
        raise FileFormatError(f"{path}: checkpoint is corrupt (checksum mismatch) in tensor {bad!r}; "
                              "delete it to train from the start")


def checkpoint_run_id(path: Path) -> str | None:
    """The run id a checkpoint was written for (None when unreadable), without loading tensors."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
        return json.loads(raw).get("run_id") if raw else None
    except (SafetensorError, OSError, ValueError):
        return None
