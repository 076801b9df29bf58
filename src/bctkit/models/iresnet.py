"""IResNet face-recognition backbones (iresnet18 ... iresnet200) with the module layout and parameter
names of insightface's arcface_torch, so its released state dicts load with strict key matching.

Layout: stem conv1 (3x3, 64) - bn1 - prelu; four stages layer1..layer4 of pre-activation
:class:`IBasicBlock` (64, 128, 256, 512 channels, each stage starting with a stride-2 block whose
shortcut is ``downsample`` = 1x1 conv + BN); then bn2 - flatten - dropout - fc (512*7*7 ->
``embedding_dim``) - ``features`` (BatchNorm1d with its scale fixed to 1). A 112x112 input leaves a
7x7 map (arcface_torch's fixed size); other square sizes that are multiples of 16 give an fc of
512*(size/16)**2 inputs with the same parameter names (the CPU upgrade demo uses 32x32).
"""

from __future__ import annotations

import torch
from torch import nn

from bctkit.models.base import EmbeddingNet
from bctkit.models.config import BackboneConfig, check_iresnet, iresnet_final_map

# Blocks per stage (the published depths count 2 convolutions per block, plus stem and fc), for
# the names of config.IRESNET_ARCHS.
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3 (strided) - BN, added to the (downsampled) input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(EmbeddingNet):
    """arcface_torch's IResNet for ``config.arch`` in :data:`IRESNET_LAYERS`; ``forward`` gives the
    ``embedding_dim`` (arcface_torch's ``num_features``) embedding of a 112x112 image (or the
    config's other size, see :func:`~bctkit.models.config.check_iresnet`)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg)
        check_iresnet(cfg)
        self.conv1 = nn.Conv2d(cfg.in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        n1, n2, n3, n4 = IRESNET_LAYERS[cfg.arch]
        self.layer1 = _stage(64, 64, n1)
        self.layer2 = _stage(64, 128, n2)
        self.layer3 = _stage(128, 256, n3)
        self.layer4 = _stage(256, 512, n4)
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(512 * iresnet_final_map(cfg) ** 2, cfg.embedding_dim)
        self.features = nn.BatchNorm1d(cfg.embedding_dim, eps=1e-5)
        # arcface_torch's initialisation: N(0, 0.1) convolutions, unit BN, a frozen unit BN1d scale.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x).flatten(1))
        return self.features(self.fc(x))


def _stage(cin: int, cout: int, blocks: int) -> nn.Sequential:
    """One stage: a stride-2 block from ``cin`` to ``cout`` channels, then ``blocks - 1`` more."""
    return nn.Sequential(IBasicBlock(cin, cout, 2), *(IBasicBlock(cout, cout, 1) for _ in range(blocks - 1)))
