"""Small Vision Transformers (vit_tiny, vit_small) with timm's VisionTransformer parameter names, the
Transformer side of BT^2's CNN -> Transformer upgrade.

Layout: ``patch_embed.proj`` (patch x patch convolution, stride patch) -> tokens; a learnable
``cls_token`` is prepended and ``pos_embed`` (one vector per token) added; 12 pre-norm ``blocks``
(norm1 - attn.qkv / attn.proj, norm2 - mlp.fc1 - GELU - mlp.fc2, each with a residual); ``norm``
(LayerNorm) of the class token - dropout - ``head`` to ``embedding_dim``. Any image size divisible
by the patch works; ``pos_embed`` is sized for the configured one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bctkit.models.base import EmbeddingNet
from bctkit.models.config import BackboneConfig, check_vit, vit_patch

# (token width, attention heads, blocks), as timm's vit_tiny_* / vit_small_*, for the names of
# config.VIT_ARCHS.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 3, 12),
    "vit_small": (384, 6, 12),
}
MLP_RATIO = 4
LN_EPS = 1e-6


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> one token each, [B, H/p * W/p, dim]."""

    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape[0], x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 - GELU - fc2, widening by :data:`MLP_RATIO` in between."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, MLP_RATIO * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(MLP_RATIO * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm1(x)), then + mlp(norm2(.))."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(EmbeddingNet):
    """ViT for ``config.arch`` in :data:`VIT_SIZES` with ``config.patch_size`` patches; the embedding
    is the projected class token."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg)
        check_vit(cfg)
        dim, heads, depth = VIT_SIZES[cfg.arch]
        patch = vit_patch(cfg)
        c, h, w = cfg.input_shape
        self.patch_embed = PatchEmbed(c, dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (h // patch) * (w // patch) + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(dim, cfg.embedding_dim)
        # timm's initialisation: truncated N(0, 0.02) position and linear weights, a near-zero class token.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        cls = self.norm(self.blocks(tokens)[:, 0])
        return self.head(self.dropout(cls))
