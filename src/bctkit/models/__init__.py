"""Models: embedding backbones and classification heads."""

from bctkit.models.backbones import BackboneConfig, ResNet, build_backbone
from bctkit.models.heads import HeadConfig, build_head

__all__ = ["BackboneConfig", "HeadConfig", "ResNet", "build_backbone", "build_head"]
