"""Small ViTs: timm's parameter names, timm's published parameter counts, forward shapes for any
patch-divisible size, attention against torch's own multi-head attention, the forward pass against
a functional re-statement of timm's, BT^2 around a ViT."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from bctkit.models import BackboneConfig, build_backbone
from bctkit.models.bt2 import BT2Net
from bctkit.models.config import BT2Layout
from bctkit.models.vit import VisionTransformer

# timm's vit_tiny_patch16_224 / vit_small_patch16_224 with their 1000-class heads: 5,717,416 and
# 22,050,664 parameters (tiny: patch embed 192*3*16*16 + 192, cls 192, 197 * 192 positions, 12 blocks
# of 444,864, norm 384, head 192*1000 + 1000).
PUBLISHED = {"vit_tiny": 5_717_416, "vit_small": 22_050_664}


def block_keys(i: int, d: int) -> dict[str, tuple[int, ...]]:
    return {f"blocks.{i}.norm1.weight": (d,), f"blocks.{i}.norm1.bias": (d,),
            f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.norm2.weight": (d,), f"blocks.{i}.norm2.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (4 * d, d), f"blocks.{i}.mlp.fc1.bias": (4 * d,),
            f"blocks.{i}.mlp.fc2.weight": (d, 4 * d), f"blocks.{i}.mlp.fc2.bias": (d,)}


def test_vit_tiny_names_and_shapes():
    cfg = BackboneConfig(arch="vit_tiny", in_channels=1, image_size=[64, 32], embedding_dim=24)
    net = build_backbone(cfg)
    assert isinstance(net, VisionTransformer)
    sd = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = {"cls_token": (1, 1, 192), "pos_embed": (1, 4 * 2 + 1, 192),
                "patch_embed.proj.weight": (192, 1, 16, 16), "patch_embed.proj.bias": (192,),
                **block_keys(0, 192), **block_keys(11, 192),
                "norm.weight": (192,), "norm.bias": (192,), "head.weight": (24, 192), "head.bias": (24,)}
    assert {k: sd[k] for k in expected if k in sd} == expected
    assert {k.split(".")[1] for k in sd if k.startswith("blocks.")} == {str(i) for i in range(12)}
    assert len(sd) == 4 + 12 * 12 + 4


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_published_parameter_counts(arch):
    net = build_backbone(BackboneConfig(arch=arch, image_size=224, embedding_dim=1000))
    assert sum(p.numel() for p in net.parameters()) == PUBLISHED[arch]


@pytest.mark.parametrize(("size", "patch", "tokens"), [(32, 16, 5), ([48, 32], 16, 7), (32, 8, 17)])
def test_forward_shapes(size, patch, tokens):
    torch.manual_seed(0)
    cfg = BackboneConfig(arch="vit_tiny", image_size=size, patch_size=patch, embedding_dim=20, dropout=0.1)
    net = build_backbone(cfg).eval()
    assert net.pos_embed.shape == (1, tokens, 192)
    x = torch.randn(2, *cfg.input_shape)
    with torch.no_grad():
        e = net(x)
    assert e.shape == (2, 20) and torch.isfinite(e).all()
    f, z = net.forward_train(x)
    assert torch.equal(f, z) and f.shape == (2, 20)


def test_attention_matches_torch_multihead():
    """The fused qkv projection splits into q, k, v and heads as torch's MultiheadAttention does."""
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(arch="vit_small", image_size=32, embedding_dim=8))
    attn = net.blocks[0].attn
    mha = torch.nn.MultiheadAttention(384, 6, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
        x = torch.randn(2, 5, 384)
        ref, _ = mha(x, x, x, need_weights=False)
        assert torch.allclose(attn(x), ref, atol=1e-5)


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int, patch: int) -> torch.Tensor:
    """timm's VisionTransformer forward (eval mode, class-token pooling), restated with explicit
    attention arithmetic: patches + class token + positions; pre-norm blocks of multi-head
    attention and a GELU MLP, each residual; LayerNorm of the class token; head."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(t), -1, -1), t], dim=1) + sd["pos_embed"]
    b, n, d = t.shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}"
        h = F.layer_norm(t, (d,), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], 1e-6)
        qkv = F.linear(h, sd[f"{p}.attn.qkv.weight"], sd[f"{p}.attn.qkv.bias"]).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, n, heads, d // heads).transpose(1, 2) for z in qkv)
        weights = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)
        a = (weights @ v).transpose(1, 2).reshape(b, n, d)
        t = t + F.linear(a, sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"])
        h = F.layer_norm(t, (d,), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], 1e-6)
        h = F.gelu(F.linear(h, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"]))
        t = t + F.linear(h, sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
    cls = F.layer_norm(t[:, 0], (d,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return F.linear(cls, sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize(("arch", "heads"), [("vit_tiny", 3), ("vit_small", 6)])
def test_forward_matches_timm_description(arch, heads):
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(arch=arch, image_size=[32, 16], patch_size=8, embedding_dim=12,
                                        dropout=0.3))
    with torch.no_grad():  # non-trivial LayerNorm parameters, class token and biases
        for name, prm in net.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                prm.uniform_(0.5, 1.5)
            elif name.endswith("bias") or name == "cls_token":
                prm.normal_(0.0, 0.1)
        x = torch.randn(2, 3, 32, 16)
        got = net.eval()(x)
        ref = reference_forward(net.state_dict(), x, heads, 8)
    assert got.shape == (2, 12)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), (got - ref).abs().max()


def test_patch_must_divide_the_image():
    with pytest.raises(ValidationError, match="not divisible by patch_size=16"):
        BackboneConfig(arch="vit_tiny", image_size=[64, 40])


def test_bt2_cnn_to_vit_upgrade():
    """BT^2 wraps a ViT as it wraps a CNN: an r8 old model (12 dims) upgraded to vit_tiny."""
    torch.manual_seed(0)
    cfg = BackboneConfig(arch="vit_tiny", in_channels=1, image_size=32, embedding_dim=16,
                         bt2=BT2Layout(old_dim=12, k=8))
    net = build_backbone(cfg)
    assert isinstance(net, BT2Net) and isinstance(net.net, VisionTransformer)
    assert net.net.head.out_features == 16 + 12
    f, z = net.forward_train(torch.randn(3, 1, 32, 32))
    assert f.shape == (3, 16) and z.shape == (3, 20) and net.embedding_dim == 20
