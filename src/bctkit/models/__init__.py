"""Models: embedding backbones and classification heads."""

from bctkit.models.config import BackboneConfig
from bctkit.models.factory import build_backbone
from bctkit.models.heads import HeadConfig, build_head
from bctkit.models.small_resnet import ResNet

__all__ = ["BackboneConfig", "HeadConfig", "ResNet", "build_backbone", "build_head"]
