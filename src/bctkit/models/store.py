"""Saving and loading trained models: safetensors weights + JSON metadata, plus the fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from bctkit.errors import FileFormatError
from bctkit.models.config import BackboneConfig
from bctkit.models.factory import build_backbone
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
    """A frozen model: its backbone, its classifier head (None when it has none, as an old model
    given without one) and its metadata. An old model known only by its features has no backbone:
    ``given`` maps a data source's fingerprint to that source's features."""

    backbone: nn.Module | None
    head: Head | None
    meta: dict[str, Any]
    given: dict[str, torch.Tensor] | None = None

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def output_dim(self) -> int:
        """Size of the stored embedding."""
        if self.backbone is None:
            return int(self.meta["output_dim"])
        return int(self.backbone.config.output_dim)

    @property
    def bt2(self) -> bool:
        """Whether the embedding is BT^2-widened (its classifier then scores f, not the embedding)."""
        return self.backbone is not None and self.backbone.config.bt2 is not None


def save_model(
    path: Path, backbone: nn.Module, head: Head | None, head_cfg: HeadConfig, meta: dict[str, Any]
) -> str:
    """Write ``path`` (safetensors) and ``path.json``; returns the fingerprint. ``head`` None: a
    model without a classifier (an old model given without one)."""
    fp = fingerprint(backbone)
    full = {
        **meta,
        "fingerprint": fp,
        "backbone": backbone.config.model_dump(),
        "head": head_cfg.model_dump(),
        "num_classes": 0 if head is None else head.num_classes,
    }
    tensors = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    if head is not None:
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
        classes = int(meta["num_classes"])
        head = build_head(hcfg, bcfg.embedding_dim, classes) if classes else None
        backbone.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")})
        if head is not None:
            head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    except (KeyError, ValidationError, RuntimeError, TypeError) as exc:
        msg = str(exc).splitlines()[0]
        raise FileFormatError(f"{path}: not a bctkit model file ({msg})") from None
    if fingerprint(backbone) != meta.get("fingerprint"):
        raise FileFormatError(f"{path}: weights do not match the fingerprint in the metadata")
    freeze(backbone)
    if head is not None:
        freeze(head)
    return LoadedModel(backbone, head, meta)
