"""Backbone configuration (:class:`BackboneConfig`, every architecture) and the family tables its
validators read: which ``arch`` names exist, each family's defaults and the options each can take.

This is the bottom of :mod:`bctkit.models`: it imports no network. Each family module
(:mod:`~bctkit.models.small_resnet`, :mod:`~bctkit.models.iresnet`, :mod:`~bctkit.models.resnet`,
:mod:`~bctkit.models.vit`, :mod:`~bctkit.models.adapters`) builds the names listed here, and
:mod:`bctkit.models.registry` maps each family to its builder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

# Keys left out of a config's dump while unset, so that configs written before they existed keep
# their fingerprints and run keys.
OPTIONAL_KEYS = ("width", "bt2", "patch_size", "pool")

IMAGE_SIDES = (8, 1024)  # smallest and largest image side a config may give


class BT2Layout(BaseModel):
    """BT^2's widened embedding (methods.md item 7): the new model's f has ``embedding_dim`` = d dims,
    the stored embedding z has ``old_dim + k`` dims, of which z[:old_dim] is the block compatible
    with the old model. ``C`` weighs f against the added dims: <z, z'> = <a, a'> + C^2 <f, f'>."""

    model_config = ConfigDict(extra="forbid")

    old_dim: int = Field(ge=2, le=4096)
    k: int = Field(32, ge=1, le=4096, description="dimensions added to the old model's")
    C: float = Field(2.0, gt=0)


class BackboneConfig(BaseModel):
    """Architecture of an embedding backbone; part of every model fingerprint. Keys left out take the
    family's defaults (r*: the field defaults below; iresnet*: 3 channels, 112, 512; resnet*, vit_*,
    timm:, python:: 3 channels, 224, 512; vit_*: patch 16)."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field("r14", description="a name from bctkit.models.config.known_archs(), "
                      "timm:<model> or python:<module>:<factory>")
    width: int | None = Field(None, ge=4, le=256, description="r8/r14/r20/r18 only: channels of the first "
                              "stage (default 16, doubles per stage)")
    in_channels: int = Field(1, ge=1, le=4)
    image_size: int | tuple[int, int] = Field(32, description="side of a square image, or [height, width]")
    embedding_dim: int = Field(128, ge=2, le=4096)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bt2: BT2Layout | None = Field(None, description="wrap the backbone in BT^2's basis transformation")
    patch_size: int | None = Field(None, ge=1, le=64, description="vit_* only: patch side (default 16)")
    pool: Literal["avg", "gem"] | None = Field(None, description=(
        "resnet* only: the global pooling, avg (torchvision's, the default) or gem (generalized mean "
        "with a learnable exponent p, as image-retrieval models and UniBCT's landmark models use)"))

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data: Any) -> Any:
        return with_defaults(data) if isinstance(data, dict) else data

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        family_of(arch)
        return arch

    @field_validator("image_size", mode="before")
    @classmethod
    def _image_size(cls, size: Any) -> Any:
        """One int or [height, width], sides within :data:`IMAGE_SIDES`; [s, s] is stored as s (one
        architecture, one fingerprint)."""
        pair = isinstance(size, list | tuple)
        sides = list(size) if pair else [size]
        lo, hi = IMAGE_SIDES
        whole = all((isinstance(v, Integral) and not isinstance(v, bool))
                    or (isinstance(v, str) and v.isdigit()) for v in sides)
        if len(sides) != (2 if pair else 1) or not whole:
            raise ValueError(f"image_size={size!r}: give one int (a square image) or [height, width]")
        h, w = int(sides[0]), int(sides[-1])
        if not (lo <= h <= hi and lo <= w <= hi):
            raise ValueError(f"image_size={size!r}: each side must be between {lo} and {hi}")
        return h if h == w else (h, w)

    @model_validator(mode="after")
    def _applies_to_arch(self) -> BackboneConfig:
        check_config(self)
        return self

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Unset optional keys are left out (:data:`OPTIONAL_KEYS`), so that the configs of plain r*
        backbones serialise as they did before BT^2 and the other architectures existed."""
        data = handler(self)
        for key in OPTIONAL_KEYS:
            if data.get(key, 0) is None:
                del data[key]
        return data

    @property
    def output_dim(self) -> int:
        """Size of the stored embedding (``embedding_dim`` unless BT^2 widens it)."""
        return self.embedding_dim if self.bt2 is None else self.bt2.old_dim + self.bt2.k

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images the backbone takes."""
        if isinstance(self.image_size, int):
            return self.in_channels, self.image_size, self.image_size
        return self.in_channels, *self.image_size


# The names of each built-in family, in the order known_archs() lists them; each family module keys
# its layer table by the same names (tests/models/test_registry.py checks that they agree).
SMALL_ARCHS = ("r8", "r14", "r20", "r18")
IRESNET_ARCHS = ("iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200")
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
VIT_ARCHS = ("vit_tiny", "vit_small")

SMALL_WIDTH = 16  # r8/r14/r20/r18's default ``width``; every dump of their configs carries it
IRESNET_IMAGE_SIZE = 112  # arcface_torch's, and its published weights'
IRESNET_STRIDE = 16  # four stride-2 stages: a 112x112 image leaves a 7x7 map
VIT_PATCH = 16  # vit_*'s default ``patch_size``

TIMM_ARCH = re.compile(r"timm:[A-Za-z0-9_.\-]+")
PYTHON_ARCH = re.compile(r"python:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
TIMM_FORM = "timm:<model name>, e.g. timm:convnext_tiny"
PYTHON_FORM = "python:<module>:<factory>, e.g. python:mypkg.nets:make_net"


@dataclass(frozen=True)
class Family:
    """A group of architectures built by one function (:data:`bctkit.models.registry.BUILDERS`).
    ``defaults`` fill the config keys the user left out (standard networks take 3-channel images at
    their usual size); ``check`` rejects options the architecture cannot take (with a message naming
    the field)."""

    name: str
    archs: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    check: Callable[[BackboneConfig], None] | None = None
    prefix: str | None = None  # external families: ``arch`` starts with it


def _check_small(cfg: BackboneConfig) -> None:
    if not isinstance(cfg.image_size, int):
        raise ValueError(f"image_size={list(cfg.image_size)}: {cfg.arch} takes square images; give one int")


def iresnet_final_map(cfg: BackboneConfig) -> int:
    """The side of the map an IResNet's fc reads: 7 for arcface_torch's 112x112 images."""
    return cfg.input_shape[1] // IRESNET_STRIDE


def check_iresnet(cfg: BackboneConfig) -> None:
    """The fc reads the last stage's whole map, so the image is square with a side that is a multiple
    of 16; arcface_torch's networks (and published weights) take 112 (a 7x7 map)."""
    _, h, w = cfg.input_shape
    if h != w or h % IRESNET_STRIDE:
        size = IRESNET_IMAGE_SIZE
        raise ValueError(
            f"image_size={cfg.image_size}: {cfg.arch} takes square images with a side that is a "
            f"multiple of {IRESNET_STRIDE} ({size}x{size} for arcface_torch's weights, whose fc reads "
            f"a 7x7 map); set image_size: {size}"
        )


def vit_patch(cfg: BackboneConfig) -> int:
    """The patch side of a vit_* config (:data:`VIT_PATCH` when unset)."""
    return VIT_PATCH if cfg.patch_size is None else cfg.patch_size


def check_vit(cfg: BackboneConfig) -> None:
    """The image must tile exactly into patches."""
    patch = vit_patch(cfg)
    _, h, w = cfg.input_shape
    if h % patch or w % patch:
        raise ValueError(
            f"image_size={cfg.image_size} is not divisible by patch_size={patch} ({cfg.arch}); "
            "change image_size or patch_size"
        )


_STANDARD = {"in_channels": 3, "embedding_dim": 512}
FAMILIES: tuple[Family, ...] = (
    Family("small", SMALL_ARCHS, {"width": SMALL_WIDTH}, _check_small),
    Family("iresnet", IRESNET_ARCHS, {**_STANDARD, "image_size": IRESNET_IMAGE_SIZE}, check_iresnet),
    Family("resnet", RESNET_ARCHS, {**_STANDARD, "image_size": 224}),
    Family("vit", VIT_ARCHS, {**_STANDARD, "image_size": 224, "patch_size": VIT_PATCH}, check_vit),
    Family("timm", (), {**_STANDARD, "image_size": 224}, prefix="timm:"),
    Family("python", (), {**_STANDARD, "image_size": 224}, prefix="python:"),
)
_FORMS = {
    "timm": (TIMM_ARCH, TIMM_FORM),
    "python": (PYTHON_ARCH, PYTHON_FORM),
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
        raise ValueError(f"width={cfg.width} applies only to {'/'.join(SMALL_ARCHS)}, not {cfg.arch}; "
                         "remove it")
    if fam.name != "vit" and cfg.patch_size is not None:
        raise ValueError(f"patch_size={cfg.patch_size} applies only to {'/'.join(VIT_ARCHS)}, "
                         f"not {cfg.arch}; remove it")
    if fam.name != "resnet" and cfg.pool is not None:
        raise ValueError(f"pool={cfg.pool} applies only to {'/'.join(RESNET_ARCHS)}, not {cfg.arch}; "
                         "remove it")
    if fam.check is not None:
        fam.check(cfg)


def embedding_layout(cfg: BackboneConfig) -> dict[str, Any] | None:
    """Which coordinates of a widened (BT^2) embedding do what; None for a plain embedding."""
    if cfg.bt2 is None:
        return None
    d_o, total = cfg.bt2.old_dim, cfg.output_dim
    return {"bct": [0, d_o], "added": [d_o, total], "self_test": [0, total], "cross_test": [0, d_o],
            "f_dim": cfg.embedding_dim, "C": cfg.bt2.C}
