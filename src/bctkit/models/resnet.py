"""ImageNet-style ResNets (resnet18/34/50/101) with torchvision's module layout and parameter names,
so a torchvision trunk loads with strict key matching once its 1000-class ``fc`` is skipped
(``load_backbone_weights(net, path, skip=("fc.",))``).

Layout: stem conv1 (7x7, stride 2, 64) - bn1 - ReLU - 3x3 max pool; layer1..layer4 of
:class:`BasicBlock` (resnet18/34) or :class:`Bottleneck` (resnet50/101, 4x expanded output), the
first block of layers 2-4 strided, a ``downsample`` (1x1 conv + BN) wherever the shape changes;
adaptive average pool (any input size or aspect ratio) - dropout - ``fc`` to ``embedding_dim``.

``pool: gem`` replaces the average pool by :class:`GeM` (generalized mean pooling, Radenovic et al.,
TPAMI 2018), the pooling of image-retrieval networks and of UniBCT's landmark models, as the module
``pool`` with cirtorch's parameter name ``pool.p``. A torchvision trunk loads into such a network with
``skip=("fc.", "pool.")`` (p keeps its initial 3).
"""

from __future__ import annotations

import torch
from torch import nn

from bctkit.models.base import EmbeddingNet
from bctkit.models.config import BackboneConfig


class GeM(nn.Module):
    """Generalized mean pooling over the spatial map: (mean over h, w of x^p)^(1/p), per channel,
    with x clamped to ``eps`` and a learnable p (p = 1: average pooling, p -> inf: max pooling)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), p))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1), keepdim=True).pow(1.0 / self.p)


class BasicBlock(nn.Module):
    """conv3x3 (strided) - BN - ReLU - conv3x3 - BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """conv1x1 - BN - ReLU - conv3x3 (strided) - BN - ReLU - conv1x1 (4x planes) - BN, plus the
    shortcut, then ReLU (torchvision's v1.5: the stride sits on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


RESNET_LAYERS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class TorchvisionResNet(EmbeddingNet):
    """torchvision's ResNet for ``config.arch`` in :data:`RESNET_LAYERS`, with ``in_channels`` input
    channels and ``fc`` producing the ``embedding_dim`` embedding."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg)
        block, (n1, n2, n3, n4) = RESNET_LAYERS[cfg.arch]
        self.conv1 = nn.Conv2d(cfg.in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        e = block.expansion
        self.layer1 = _stage(block, 64, 64, n1, 1)
        self.layer2 = _stage(block, 64 * e, 128, n2, 2)
        self.layer3 = _stage(block, 128 * e, 256, n3, 2)
        self.layer4 = _stage(block, 256 * e, 512, n4, 2)
        if cfg.pool == "gem":
            self.pool: nn.Module = GeM()
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(512 * e, cfg.embedding_dim)
        # torchvision's initialisation: He (fan-out) convolutions, unit BN.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        pooled = self.pool(x) if self.config.pool == "gem" else self.avgpool(x)
        return self.fc(self.dropout(pooled.flatten(1)))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """The projection shortcut (1x1 conv + BN) where the block changes the shape, else None."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def _stage(block: type[BasicBlock] | type[Bottleneck], cin: int, planes: int, n: int,
           stride: int) -> nn.Sequential:
    """``n`` blocks of ``planes`` (times the block's expansion) output channels; the first strided."""
    out = planes * block.expansion
    return nn.Sequential(block(cin, planes, stride), *(block(out, planes, 1) for _ in range(n - 1)))
