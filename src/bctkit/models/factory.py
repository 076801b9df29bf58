"""The one way to build a backbone from its config: :func:`build_backbone`, above both the family
registry (plain backbones) and BT^2's wrapper (which builds its inner backbone through the registry)."""

from __future__ import annotations

from bctkit.models.base import EmbeddingNet
from bctkit.models.bt2 import BT2Net
from bctkit.models.config import BackboneConfig
from bctkit.models.registry import build_plain


def build_backbone(cfg: BackboneConfig) -> EmbeddingNet:
    """Instantiate the backbone ``cfg`` describes, wrapped in BT^2's basis transformation when
    ``cfg.bt2`` is set."""
    if cfg.bt2 is not None:
        return BT2Net(cfg)
    return build_plain(cfg)
