"""The interface every embedding backbone shares, so trainers, BT^2 and the model store treat all
architectures alike."""

from __future__ import annotations

import torch
from torch import nn

from bctkit.models.config import BackboneConfig


class EmbeddingNet(nn.Module):
    """Base of every built backbone: holds its :class:`BackboneConfig` as ``config``; ``forward(x)``
    returns the stored embedding [B, ``embedding_dim``]."""

    __jit_unused_properties__ = ["embedding_dim"]  # reads the pydantic config: not TorchScript

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.config = cfg

    @property
    def embedding_dim(self) -> int:
        """Size of the stored embedding (BT^2 widens it beyond ``config.embedding_dim``)."""
        return self.config.output_dim

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features for the base classification head, stored embedding): the same tensor here;
        models that widen their embedding (BT^2) return two."""
        e = self(x)
        return e, e
