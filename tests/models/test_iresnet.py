"""IResNet: the parameter names and shapes of arcface_torch's iresnet50, written out by hand from its
published architecture; the forward pass against a functional re-statement of arcface_torch's; a
state dict in that layout loads and reproduces the outputs."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from bctkit.models import BackboneConfig, build_backbone
from bctkit.models.iresnet import IRESNET_LAYERS, IResNet
from bctkit.models.weights import load_backbone_weights


def bn(name: str, c: int) -> dict[str, tuple[int, ...]]:
    """The five state-dict entries of a BatchNorm layer of ``c`` channels."""
    return {f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
            f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()}


# arcface_torch iresnet50: stem conv3x3 3->64, stages of 3, 4, 14, 3 IBasicBlocks of 64, 128, 256,
# 512 channels; every stage starts with a stride-2 block whose shortcut is a 1x1 conv + BN.
STEM = {"conv1.weight": (64, 3, 3, 3), **bn("bn1", 64), "prelu.weight": (64,)}
BLOCKS = {
    "layer1.0": {**bn("bn1", 64), "conv1.weight": (64, 64, 3, 3), **bn("bn2", 64), "prelu.weight": (64,),
                 "conv2.weight": (64, 64, 3, 3), **bn("bn3", 64),
                 "downsample.0.weight": (64, 64, 1, 1), **bn("downsample.1", 64)},
    "layer1.2": {**bn("bn1", 64), "conv1.weight": (64, 64, 3, 3), **bn("bn2", 64), "prelu.weight": (64,),
                 "conv2.weight": (64, 64, 3, 3), **bn("bn3", 64)},
    "layer2.0": {**bn("bn1", 64), "conv1.weight": (128, 64, 3, 3), **bn("bn2", 128), "prelu.weight": (128,),
                 "conv2.weight": (128, 128, 3, 3), **bn("bn3", 128),
                 "downsample.0.weight": (128, 64, 1, 1), **bn("downsample.1", 128)},
    "layer2.3": {**bn("bn1", 128), "conv1.weight": (128, 128, 3, 3), **bn("bn2", 128), "prelu.weight": (128,),
                 "conv2.weight": (128, 128, 3, 3), **bn("bn3", 128)},
    "layer3.0": {**bn("bn1", 128), "conv1.weight": (256, 128, 3, 3), **bn("bn2", 256), "prelu.weight": (256,),
                 "conv2.weight": (256, 256, 3, 3), **bn("bn3", 256),
                 "downsample.0.weight": (256, 128, 1, 1), **bn("downsample.1", 256)},
    "layer3.13": {**bn("bn1", 256), "conv1.weight": (256, 256, 3, 3), **bn("bn2", 256),
                  "prelu.weight": (256,), "conv2.weight": (256, 256, 3, 3), **bn("bn3", 256)},
    "layer4.0": {**bn("bn1", 256), "conv1.weight": (512, 256, 3, 3), **bn("bn2", 512), "prelu.weight": (512,),
                 "conv2.weight": (512, 512, 3, 3), **bn("bn3", 512),
                 "downsample.0.weight": (512, 256, 1, 1), **bn("downsample.1", 512)},
    "layer4.2": {**bn("bn1", 512), "conv1.weight": (512, 512, 3, 3), **bn("bn2", 512), "prelu.weight": (512,),
                 "conv2.weight": (512, 512, 3, 3), **bn("bn3", 512)},
}
TAIL = {**bn("bn2", 512), "fc.weight": (512, 512 * 7 * 7), "fc.bias": (512,), **bn("features", 512)}
STAGE_BLOCKS = {"layer1": 3, "layer2": 4, "layer3": 14, "layer4": 3}
# Keys: stem 7; 24 blocks of 18 (bn1, conv1, bn2, prelu, conv2, bn3), +6 for the 4 downsamples; tail 12.
N_KEYS = 7 + 24 * 18 + 4 * 6 + 12  # 475
# Parameters (buffers excluded): stem 1728 + 128 + 64; a first block 2*cin + 10*cin*c + 9*c^2 + 7*c,
# another 18*c^2 + 7*c: stage 1 78400 + 2 * 74176, stage 2 230400 + 3 * 295808, stage 3
# 919552 + 13 * 1181440, stage 4 3674112 + 2 * 4722176; bn2 1024; fc 25088*512 + 512; features 1024.
N_PARAMS = 1920 + 226752 + 1117824 + 16278272 + 13118464 + 1024 + 12845568 + 1024  # 43,590,848


@pytest.fixture(scope="module")
def r50() -> IResNet:
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(arch="iresnet50"))
    assert isinstance(net, IResNet)
    return net


def _shapes(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) + 1:]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix + ".")}


def test_iresnet50_layout(r50):
    sd = r50.state_dict()
    top = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("layer")}
    assert top == {**STEM, **TAIL}
    for prefix, table in BLOCKS.items():
        assert _shapes(sd, prefix) == table, prefix
    for stage, n in STAGE_BLOCKS.items():
        assert {k.split(".")[1] for k in sd if k.startswith(stage + ".")} == {str(i) for i in range(n)}
    assert len(sd) == N_KEYS == 475
    assert sum(p.numel() for p in r50.parameters()) == N_PARAMS == 43_590_848
    assert not r50.features.weight.requires_grad and torch.all(r50.features.weight == 1)


def test_iresnet50_forward_and_round_trip(r50, tmp_path):
    """A torch.save'd state dict in arcface_torch's layout (BN statistics made non-trivial) loads
    with weights_only into a freshly built model, which then gives the same embeddings."""
    with torch.no_grad():
        for m in r50.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = r50.eval()(x)
    assert ref.shape == (2, 512) and torch.isfinite(ref).all()
    path = tmp_path / "backbone.pth"
    torch.save(r50.state_dict(), path)
    torch.manual_seed(1)
    fresh = build_backbone(BackboneConfig(arch="iresnet50"))
    key = "layer3.13.conv2.weight"
    assert not torch.equal(fresh.state_dict()[key], r50.state_dict()[key])
    load_backbone_weights(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), ref)
    assert not fresh.features.weight.requires_grad


@pytest.mark.parametrize(("arch", "blocks"), [("iresnet18", (2, 2, 2, 2)), ("iresnet34", (3, 4, 6, 3)),
                                              ("iresnet100", (3, 13, 30, 3))])
def test_depths(arch, blocks):
    net = build_backbone(BackboneConfig(arch=arch, embedding_dim=64))
    for i, n in enumerate(blocks):
        assert len(getattr(net, f"layer{i + 1}")) == n
    assert net.fc.in_features == 512 * 49 and net.fc.out_features == 64


@pytest.mark.parametrize("size", [100, 120, [112, 96]])
def test_input_size_is_square_multiple_of_16(size):
    with pytest.raises(ValidationError, match="iresnet50 takes square images with a side that is a multiple"):
        BackboneConfig(arch="iresnet50", image_size=size)


def test_smaller_input_keeps_the_names_and_sizes_the_fc_to_its_map():
    """A 32x32 iresnet18 (the CPU upgrade demo's) has every parameter of the 112x112 one under the
    same name and shape, except the fc, which reads a 2x2 map instead of 7x7."""
    small = build_backbone(BackboneConfig(arch="iresnet18", embedding_dim=64, image_size=32))
    ref = build_backbone(BackboneConfig(arch="iresnet18", embedding_dim=64))
    a, b = small.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if a[k].shape != b[k].shape] == ["fc.weight"]
    assert small.fc.in_features == 512 * 4
    assert small.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_iresnet200_depth_without_building_it():
    """arcface_torch's iresnet200: 6, 26, 60, 6 blocks (too large to build in a unit test)."""
    assert IRESNET_LAYERS["iresnet200"] == (6, 26, 60, 6)


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
    """arcface_torch's IResNet forward in eval mode, restated with torch.nn.functional from its
    description: stem conv - bn1 - prelu; per block bn1 - conv1 - bn2 - prelu - conv2 (strided) - bn3
    plus the (downsampled) input; bn2 - flatten - fc - features."""

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], False, 0.0, 1e-5)

    x = F.prelu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"), sd["prelu.weight"])
    for s, n in enumerate(layers, 1):
        for b in range(n):
            p, stride = f"layer{s}.{b}", 2 if b == 0 else 1
            out = F.conv2d(bn(x, f"{p}.bn1"), sd[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(bn(out, f"{p}.bn2"), sd[f"{p}.prelu.weight"])
            out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn3")
            if b == 0:
                x = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            x = out + x
    x = F.linear(bn(x, "bn2").flatten(1), sd["fc.weight"], sd["fc.bias"])
    return bn(x, "features")


def test_forward_matches_arcface_torch_description():
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(arch="iresnet18", embedding_dim=32, dropout=0.3))
    x = torch.randn(2, 3, 112, 112)
    for m in net.modules():  # BN statistics of this batch, so that eval-mode activations stay O(1)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        net.train()(x)
        got = net.eval()(x)
        ref = reference_forward(net.state_dict(), x, (2, 2, 2, 2))
    assert got.shape == (2, 32)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), (got - ref).abs().max()
