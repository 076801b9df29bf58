"""Classification heads (methods.md, "Classification heads"): softmax, NormFace, CosFace, ArcFace.

A head maps embeddings to logits; with labels it applies its margin to the target logit. The same
head class serves as the frozen old classifier in the BCT influence loss.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class HeadConfig(BaseModel):
    """Head type and its scale s / margin m (None = the type's default)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["softmax", "normface", "cosface", "arcface"] = "arcface"
    s: float | None = Field(None, gt=0)
    m: float | None = Field(None, ge=0)

    def resolved(self) -> tuple[float, float]:
        """(s, m) with the per-type defaults: ArcFace 64 / 0.5, CosFace 64 / 0.4, NormFace 64 / 0."""
        s_default, m_default = {
            "softmax": (1.0, 0.0),
            "normface": (64.0, 0.0),
            "cosface": (64.0, 0.4),
            "arcface": (64.0, 0.5),
        }[self.type]
        return (s_default if self.s is None else self.s, m_default if self.m is None else self.m)


class Head(nn.Module):
    """Base: ``logits(feats, labels)``; calling the head returns the cross-entropy loss."""

    weight: nn.Parameter

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def logits(self, feats: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(feats, labels), labels)


class SoftmaxHead(Head):
    """Plain linear classifier W f + b on unnormalised features."""

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__(embedding_dim, num_classes)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def logits(self, feats: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(feats, self.weight, self.bias)


class CosineHead(Head):
    """s * cos(theta_j) for all classes; subclasses change the target logit."""

    def __init__(self, embedding_dim: int, num_classes: int, s: float, m: float) -> None:
        super().__init__(embedding_dim, num_classes)
        self.s, self.m = float(s), float(m)

    def cosine(self, feats: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(feats, dim=1), F.normalize(self.weight, dim=1))

    def margin(self, cos_target: torch.Tensor) -> torch.Tensor:
        """The target cosine after the margin (NormFace: unchanged)."""
        return cos_target

    def logits(self, feats: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(feats)
        if labels is None:
            return self.s * cos
        cos = cos.clamp(-1.0, 1.0)
        target = cos.gather(1, labels[:, None])
        cos = cos.scatter(1, labels[:, None], self.margin(target))
        return self.s * cos


class NormFaceHead(CosineHead):
    """NormFace: s * cos(theta_j), no margin."""


class CosFaceHead(CosineHead):
    """CosFace: target s * (cos(theta_y) - m)."""

    def margin(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.m


class ArcFaceHead(CosineHead):
    """ArcFace: target s * cos(theta_y + m) when cos(theta_y) > cos(pi - m), else the fallback
    s * (cos(theta_y) - m sin(pi - m)) that keeps the logit monotonic in theta."""

    def margin(self, cos_target: torch.Tensor) -> torch.Tensor:
        sin = (1.0 - cos_target.square()).clamp_min(0.0).sqrt()
        with_margin = cos_target * math.cos(self.m) - sin * math.sin(self.m)
        fallback = cos_target - self.m * math.sin(math.pi - self.m)
        return torch.where(cos_target > math.cos(math.pi - self.m), with_margin, fallback)


def build_head(cfg: HeadConfig, embedding_dim: int, num_classes: int) -> Head:
    """Instantiate the head described by ``cfg``."""
    if cfg.type == "softmax":
        return SoftmaxHead(embedding_dim, num_classes)
    s, m = cfg.resolved()
    cls = {"normface": NormFaceHead, "cosface": CosFaceHead, "arcface": ArcFaceHead}[cfg.type]
    return cls(embedding_dim, num_classes, s, m)
