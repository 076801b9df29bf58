"""Backbones by name: which function builds each family of :data:`bctkit.models.config.FAMILIES`,
and :func:`build_plain`, the backbone a config names without BT^2's wrapper.

Families: ``r8 r14 r20 r18`` (bctkit's small ResNet for small images, :mod:`bctkit.models.small_resnet`),
``iresnet18 ... iresnet200`` (arcface_torch, :mod:`bctkit.models.iresnet`), ``resnet18 ... resnet101``
(torchvision, :mod:`bctkit.models.resnet`), ``vit_tiny vit_small`` (timm names, :mod:`bctkit.models.vit`)
and the external forms ``timm:<model>`` / ``python:<module>:<factory>`` (:mod:`bctkit.models.adapters`).
Their names, defaults and option checks are in :mod:`bctkit.models.config`; BT^2's wrapper sits
above this module (:mod:`bctkit.models.bt2`, built by :func:`bctkit.models.factory.build_backbone`).
"""

from __future__ import annotations

from collections.abc import Callable

from bctkit.models import adapters, iresnet, resnet, small_resnet, vit
from bctkit.models.base import EmbeddingNet
from bctkit.models.config import BackboneConfig, family_of

# The function that builds each family, by Family.name (one per entry of config.FAMILIES).
BUILDERS: dict[str, Callable[[BackboneConfig], EmbeddingNet]] = {
    "small": small_resnet.ResNet,
    "iresnet": iresnet.IResNet,
    "resnet": resnet.TorchvisionResNet,
    "vit": vit.VisionTransformer,
    "timm": adapters.build_timm,
    "python": adapters.build_python,
}


def build_plain(cfg: BackboneConfig) -> EmbeddingNet:
    """Instantiate the backbone of ``cfg.arch`` as its family builds it; ``cfg.bt2`` must be unset
    (:func:`bctkit.models.factory.build_backbone` builds any config)."""
    if cfg.bt2 is not None:
        raise ValueError("build_plain builds no BT^2 wrapper; use bctkit.models.build_backbone")
    return BUILDERS[family_of(cfg.arch).name](cfg)

