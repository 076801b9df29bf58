"""What identifies a run and its models: run keys (hashes of what trains a model), model seeds,
and how a run directory's stored config differs from a new one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bctkit.errors import FileFormatError
from bctkit.run.config import RunConfig
from bctkit.storage import read_json

KEY = {"key": True}
"""Serialisation context of configs that go into run keys (drops options that do not change a
result, such as train.checkpoint_every)."""


def run_key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_seed(seed: int, name: str) -> int:
    """Initialisation seed of model ``name``: derived from the configured seed and the name, so
    old and new models never share initial weights (a shared initialisation makes an independently
    trained new model look partly compatible with the old one)."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def read_config(path: Path) -> dict[str, Any] | None:
    """A run directory's config.json, or None when absent or unreadable."""
    try:
        data = read_json(path, allow_nan=True)
    except FileFormatError:
        return None
    return data if isinstance(data, dict) else None


def config_differences(stored: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Dotted keys whose values differ between a run directory's config.json and ``cfg``, counting
    only what changes results (not train.checkpoint_every, train.device)."""
    try:
        old = RunConfig.model_validate(stored).model_dump(mode="json", context=KEY)
    except ValueError:
        old = stored
    a, b = _flat(old), _flat(cfg.model_dump(mode="json", context=KEY))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
