"""bctkit's small ResNet-style backbones r8/r14/r20/r18 (the "small" family: IResNet layout of
arcface_torch, sized for small images)."""

from __future__ import annotations

import torch
from torch import nn

from bctkit.models.base import EmbeddingNet
from bctkit.models.config import BackboneConfig

# Blocks per stage for each named depth (the names of config.SMALL_ARCHS); every stage halves the
# resolution.
DEPTHS: dict[str, tuple[int, ...]] = {
    "r8": (1, 1, 1),
    "r14": (2, 2, 2),
    "r20": (3, 3, 3),
    "r18": (2, 2, 2, 2),
}


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
