"""Saving and loading trained models: safetensors weights + JSON metadata, plus the fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from torch import nn

from bctkit.errors import FileFormatError
from bctkit.models.backbones import BackboneConfig, build_backbone
from bctkit.models.heads import Head, HeadConfig, build_head
from bctkit.storage import load_tensors, save_tensors, write_json


def fingerprint(backbone: nn.Module) -> str:
    """Hash of the architecture config and every weight/buffer: identifies the embedding function."""
    h = hashlib.sha256(json.dumps(backbone.config.model_dump(), sort_keys=True).encode())
    for name, t in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients and no stale .grad: how every old model and old classifier is held."""
    module.eval()
    module.zero_grad(set_to_none=True)
    module.requires_grad_(False)
    return module


@dataclass
class LoadedModel:
    backbone: nn.Module
    head: Head
    meta: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])


def save_model(
    path: Path, backbone: nn.Module, head: Head, head_cfg: HeadConfig, meta: dict[str, Any]
) -> str:
    """Write ``path`` (safetensors) and ``path.json``; returns the fingerprint."""
    fp = fingerprint(backbone)
    full = {
        **meta,
        "fingerprint": fp,
        "backbone": backbone.config.model_dump(),
        "head": head_cfg.model_dump(),
        "num_classes": head.num_classes,
    }
    tensors = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    tensors.update({f"head.{k}": v for k, v in head.state_dict().items()})
    save_tensors(path, tensors, full)
    write_json(Path(path).with_suffix(".json"), full)
    return fp


def load_model(path: Path) -> LoadedModel:
    """Load a model saved by :func:`save_model`, frozen (eval mode, no gradients)."""
    tensors, meta = load_tensors(path)
    try:
        bcfg = BackboneConfig(**meta["backbone"])
        hcfg = HeadConfig(**meta["head"])
        backbone = build_backbone(bcfg)
        head = build_head(hcfg, bcfg.embedding_dim, int(meta["num_classes"]))
        backbone.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")})
        head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    except (KeyError, ValidationError, RuntimeError, TypeError) as exc:
        msg = str(exc).splitlines()[0]
        raise FileFormatError(f"{path}: not a bctkit model file ({msg})") from None
    if fingerprint(backbone) != meta.get("fingerprint"):
        raise FileFormatError(f"{path}: weights do not match the fingerprint in the metadata")
    freeze(backbone)
    freeze(head)
    return LoadedModel(backbone, head, meta)
