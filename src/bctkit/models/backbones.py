"""Backbone configuration (:class:`BackboneConfig`, every architecture) and bctkit's small
ResNet-style backbones r8/r14/r20/r18 (IResNet layout of arcface_torch, sized for small images).
The other architectures are listed in :mod:`bctkit.models.registry`."""

from __future__ import annotations

from numbers import Integral
from typing import Any

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from torch import nn

from bctkit.models.base import EmbeddingNet

# Blocks per stage for each named depth; every stage halves the resolution.
DEPTHS: dict[str, tuple[int, ...]] = {
    "r8": (1, 1, 1),
    "r14": (2, 2, 2),
    "r20": (3, 3, 3),
    "r18": (2, 2, 2, 2),
}
# Keys left out of a config's dump while unset, so that configs written before they existed keep
# their fingerprints and run keys.
OPTIONAL_KEYS = ("width", "bt2", "patch_size")

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

    arch: str = Field("r14", description="a name from bctkit.models.registry.known_archs(), "
                      "timm:<model> or python:<module>:<factory>")
    width: int | None = Field(None, ge=4, le=256, description="r8/r14/r20/r18 only: channels of the first "
                              "stage (default 16, doubles per stage)")
    in_channels: int = Field(1, ge=1, le=4)
    image_size: int | tuple[int, int] = Field(32, description="side of a square image, or [height, width]")
    embedding_dim: int = Field(128, ge=2, le=4096)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bt2: BT2Layout | None = Field(None, description="wrap the backbone in BT^2's basis transformation")
    patch_size: int | None = Field(None, ge=1, le=64, description="vit_* only: patch side (default 16)")

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data: Any) -> Any:
        from bctkit.models.registry import with_defaults

        return with_defaults(data) if isinstance(data, dict) else data

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        from bctkit.models.registry import family_of

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
        from bctkit.models.registry import check_config

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


class IBasicBlock(nn.Module):
    """BN - conv - BN - PReLU - conv - BN, plus a (strided) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class ResNet(EmbeddingNet):
    """Embedding network: stem, strided residual stages, then BN - dropout - flatten - FC - BN1d.

    The final BatchNorm1d has its scale fixed to 1 (arcface_torch's ``features`` layer).
    """

    __jit_unused_properties__ = ["embedding_dim"]  # reads the pydantic config: not TorchScript

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg)
        blocks = DEPTHS[cfg.arch]
        width = 16 if cfg.width is None else cfg.width
        widths = [width * 2**i for i in range(len(blocks))]
        final = cfg.input_shape[1] // 2 ** len(blocks)
        if final < 1:
            raise ValueError(f"image_size {cfg.image_size} too small for {cfg.arch}")
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.PReLU(widths[0]),
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for n, cout in zip(blocks, widths, strict=True):
            for i in range(n):
                layers.append(IBasicBlock(cin, cout, 2 if i == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cin * final * final, cfg.embedding_dim)
        self.features = nn.BatchNorm1d(cfg.embedding_dim)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = self.dropout(self.bn(x)).flatten(1)
        return self.features(self.fc(x))


def build_backbone(cfg: BackboneConfig) -> EmbeddingNet:
    """Instantiate the backbone described by ``cfg``: :func:`bctkit.models.registry.build_backbone`."""
    from bctkit.models.registry import build_backbone as build

    return build(cfg)
