"""Small ResNet-style embedding backbones (IResNet layout of arcface_torch, sized for small images)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from torch import nn

# Blocks per stage for each named depth; every stage halves the resolution.
DEPTHS: dict[str, tuple[int, ...]] = {
    "r8": (1, 1, 1),
    "r14": (2, 2, 2),
    "r20": (3, 3, 3),
    "r18": (2, 2, 2, 2),
}


class BT2Layout(BaseModel):
    """BT^2's widened embedding (methods.md item 7): the new model's f has ``embedding_dim`` = d dims,
    the stored embedding z has ``old_dim + k`` dims, of which z[:old_dim] is the block compatible
    with the old model. ``C`` weighs f against the added dims: <z, z'> = <a, a'> + C^2 <f, f'>."""

    model_config = ConfigDict(extra="forbid")

    old_dim: int = Field(ge=2, le=4096)
    k: int = Field(32, ge=1, le=4096, description="dimensions added to the old model's")
    C: float = Field(2.0, gt=0)


class BackboneConfig(BaseModel):
    """Architecture of an embedding backbone; part of every model fingerprint."""

    model_config = ConfigDict(extra="forbid")

    arch: Literal["r8", "r14", "r20", "r18"] = "r14"
    width: int = Field(16, ge=4, le=256, description="channels of the first stage (doubles per stage)")
    in_channels: int = Field(1, ge=1, le=4)
    image_size: int = Field(32, ge=8, le=512)
    embedding_dim: int = Field(128, ge=2, le=4096)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bt2: BT2Layout | None = Field(None, description="wrap the backbone in BT^2's basis transformation")

    @model_serializer(mode="wrap")
    def _omit_unset_bt2(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Plain backbones serialise without the ``bt2`` key, so their fingerprints and run keys
        are those of files written before BT^2 existed."""
        data = handler(self)
        if data.get("bt2", 0) is None:
            del data["bt2"]
        return data

    @property
    def output_dim(self) -> int:
        """Size of the stored embedding (``embedding_dim`` unless BT^2 widens it)."""
        return self.embedding_dim if self.bt2 is None else self.bt2.old_dim + self.bt2.k


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


class ResNet(nn.Module):
    """Embedding network: stem, strided residual stages, then BN - dropout - flatten - FC - BN1d.

    The final BatchNorm1d has its scale fixed to 1 (arcface_torch's ``features`` layer).
    """

    __jit_unused_properties__ = ["embedding_dim"]  # reads the pydantic config: not TorchScript

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.config = cfg
        blocks = DEPTHS[cfg.arch]
        widths = [cfg.width * 2**i for i in range(len(blocks))]
        final = cfg.image_size // 2 ** len(blocks)
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

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = self.dropout(self.bn(x)).flatten(1)
        return self.features(self.fc(x))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features for the base classification head, stored embedding): the same tensor here;
        models that widen their embedding (BT^2) return two."""
        e = self(x)
        return e, e


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """Instantiate the backbone described by ``cfg`` (a :class:`ResNet`, or BT^2's wrapper of one)."""
    if cfg.bt2 is not None:
        from bctkit.models.bt2 import BT2Net

        return BT2Net(cfg)
    return ResNet(cfg)
