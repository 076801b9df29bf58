"""Backbones by name: every ``BackboneConfig.arch`` bctkit knows, its family's defaults and checks,
and :func:`build_backbone`.

Families: ``r8 r14 r20 r18`` (bctkit's small ResNet for small images, :mod:`bctkit.models.backbones`),
``iresnet18 ... iresnet200`` (arcface_torch, :mod:`bctkit.models.iresnet`), ``resnet18 ... resnet101``
(torchvision, :mod:`bctkit.models.resnet`), ``vit_tiny vit_small`` (timm names, :mod:`bctkit.models.vit`)
and the external forms ``timm:<model>`` / ``python:<module>:<factory>`` (:mod:`bctkit.models.adapters`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bctkit.models import adapters, iresnet, resnet, vit
from bctkit.models.backbones import DEPTHS, BackboneConfig, ResNet
from bctkit.models.base import EmbeddingNet

SMALL_WIDTH = 16  # r8/r14/r20/r18's default ``width``; every dump of their configs carries it


@dataclass(frozen=True)
class Family:
    """A group of architectures built by one function. ``defaults`` fill the config keys the user
    left out (standard networks take 3-channel images at their usual size); ``check`` rejects options
    the architecture cannot take (with a message naming the field)."""

    name: str
    archs: tuple[str, ...]
    build: Callable[[BackboneConfig], EmbeddingNet]
    defaults: dict[str, Any] = field(default_factory=dict)
    check: Callable[[BackboneConfig], None] | None = None
    prefix: str | None = None  # external families: ``arch`` starts with it


def _check_small(cfg: BackboneConfig) -> None:
    if not isinstance(cfg.image_size, int):
        raise ValueError(f"image_size={list(cfg.image_size)}: {cfg.arch} takes square images; give one int")


_STANDARD = {"in_channels": 3, "embedding_dim": 512}
FAMILIES: tuple[Family, ...] = (
    Family("small", tuple(DEPTHS), ResNet, {"width": SMALL_WIDTH}, _check_small),
    Family("iresnet", tuple(iresnet.IRESNET_LAYERS), iresnet.IResNet,
           {**_STANDARD, "image_size": iresnet.IMAGE_SIZE}, iresnet.check_config),
    Family("resnet", tuple(resnet.RESNET_LAYERS), resnet.TorchvisionResNet, {**_STANDARD, "image_size": 224}),
    Family("vit", tuple(vit.VIT_SIZES), vit.VisionTransformer,
           {**_STANDARD, "image_size": 224, "patch_size": 16}, vit.check_config),
    Family("timm", (), adapters.build_timm, {**_STANDARD, "image_size": 224}, prefix="timm:"),
    Family("python", (), adapters.build_python, {**_STANDARD, "image_size": 224}, prefix="python:"),
)
_FORMS = {
    "timm": (adapters.TIMM_ARCH, adapters.TIMM_FORM),
    "python": (adapters.PYTHON_ARCH, adapters.PYTHON_FORM),
}


def known_archs() -> list[str]:
    """Every named architecture, then the two external forms."""
    names = [a for f in FAMILIES for a in f.archs]
    return [*names, "timm:<model>", "python:<module>:<factory>"]


def family_of(arch: str) -> Family:
    """The family of ``arch``; ValueError listing the known names when there is none, or when a
    ``timm:`` / ``python:`` name is malformed."""
    for fam in FAMILIES:
        if arch in fam.archs:
            return fam
        if fam.prefix is not None and arch.startswith(fam.prefix):
            pattern, form = _FORMS[fam.name]
            if not pattern.fullmatch(arch):
                raise ValueError(f"arch {arch!r} is malformed; the form is {form}")
            return fam
    raise ValueError(f"unknown arch {arch!r}; known: {', '.join(known_archs())}")


def with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A raw config mapping with its family's defaults filled in for the keys left out, and a
    ``width`` equal to the small ResNet's default dropped on other families (a config merged onto a
    dumped r* one carries it). An unknown arch is left for the arch check to report."""
    arch = data.get("arch", BackboneConfig.model_fields["arch"].default)
    try:
        fam = family_of(arch) if isinstance(arch, str) else None
    except ValueError:
        fam = None
    if fam is None:
        return data
    out = dict(data)
    for key, value in fam.defaults.items():
        if out.get(key) is None:
            out[key] = value
    if fam.name != "small" and out.get("width") == SMALL_WIDTH:
        del out["width"]
    return out


def check_config(cfg: BackboneConfig) -> None:
    """Reject options that do not apply to ``cfg.arch`` (ValueError naming the field)."""
    fam = family_of(cfg.arch)
    if fam.name != "small" and cfg.width is not None:
        raise ValueError(f"width={cfg.width} applies only to {'/'.join(DEPTHS)}, not {cfg.arch}; remove it")
    if fam.name != "vit" and cfg.patch_size is not None:
        raise ValueError(f"patch_size={cfg.patch_size} applies only to {'/'.join(vit.VIT_SIZES)}, "
                         f"not {cfg.arch}; remove it")
    if fam.check is not None:
        fam.check(cfg)


def build_backbone(cfg: BackboneConfig) -> EmbeddingNet:
    """Instantiate the backbone ``cfg`` describes, wrapped in BT^2's basis transformation when
    ``cfg.bt2`` is set."""
    if cfg.bt2 is not None:
        from bctkit.models.bt2 import BT2Net  # bt2 builds its inner backbone through this module

        return BT2Net(cfg)
    return family_of(cfg.arch).build(cfg)
