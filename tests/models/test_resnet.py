"""torchvision-layout ResNets: resnet50's parameter names and shapes written out by hand from the
published architecture, parameter totals against torchvision's published counts, the forward pass
against a functional re-statement of torchvision's, a torchvision resnet18 state dict (1000-class fc
skipped) loading, any input size."""

import pytest
import torch
import torch.nn.functional as F

from bctkit.errors import FileFormatError
from bctkit.models import BackboneConfig, build_backbone
from bctkit.models.resnet import TorchvisionResNet
from bctkit.models.weights import load_backbone_weights


def bn(name: str, c: int) -> dict[str, tuple[int, ...]]:
    """The five state-dict entries of a BatchNorm layer of ``c`` channels."""
    return {f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
            f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()}


# torchvision resnet50: stem conv7x7/2 3->64 + bn1 (+ ReLU, max pool); stages of 3, 4, 6, 3 Bottlenecks
# (1x1 width c, 3x3 width c carrying the stride, 1x1 to 4c), c = 64, 128, 256, 512; each stage's
# first block has a downsample (1x1 conv + BN) since the channels change; avg pool; fc 2048 -> d.
STEM = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
BLOCKS = {
    "layer1.0": {"conv1.weight": (64, 64, 1, 1), **bn("bn1", 64), "conv2.weight": (64, 64, 3, 3),
                 **bn("bn2", 64), "conv3.weight": (256, 64, 1, 1), **bn("bn3", 256),
                 "downsample.0.weight": (256, 64, 1, 1), **bn("downsample.1", 256)},
    "layer1.2": {"conv1.weight": (64, 256, 1, 1), **bn("bn1", 64), "conv2.weight": (64, 64, 3, 3),
                 **bn("bn2", 64), "conv3.weight": (256, 64, 1, 1), **bn("bn3", 256)},
    "layer2.0": {"conv1.weight": (128, 256, 1, 1), **bn("bn1", 128), "conv2.weight": (128, 128, 3, 3),
                 **bn("bn2", 128), "conv3.weight": (512, 128, 1, 1), **bn("bn3", 512),
                 "downsample.0.weight": (512, 256, 1, 1), **bn("downsample.1", 512)},
    "layer2.3": {"conv1.weight": (128, 512, 1, 1), **bn("bn1", 128), "conv2.weight": (128, 128, 3, 3),
                 **bn("bn2", 128), "conv3.weight": (512, 128, 1, 1), **bn("bn3", 512)},
    "layer3.0": {"conv1.weight": (256, 512, 1, 1), **bn("bn1", 256), "conv2.weight": (256, 256, 3, 3),
                 **bn("bn2", 256), "conv3.weight": (1024, 256, 1, 1), **bn("bn3", 1024),
                 "downsample.0.weight": (1024, 512, 1, 1), **bn("downsample.1", 1024)},
    "layer3.5": {"conv1.weight": (256, 1024, 1, 1), **bn("bn1", 256), "conv2.weight": (256, 256, 3, 3),
                 **bn("bn2", 256), "conv3.weight": (1024, 256, 1, 1), **bn("bn3", 1024)},
    "layer4.0": {"conv1.weight": (512, 1024, 1, 1), **bn("bn1", 512), "conv2.weight": (512, 512, 3, 3),
                 **bn("bn2", 512), "conv3.weight": (2048, 512, 1, 1), **bn("bn3", 2048),
                 "downsample.0.weight": (2048, 1024, 1, 1), **bn("downsample.1", 2048)},
    "layer4.2": {"conv1.weight": (512, 2048, 1, 1), **bn("bn1", 512), "conv2.weight": (512, 512, 3, 3),
                 **bn("bn2", 512), "conv3.weight": (2048, 512, 1, 1), **bn("bn3", 2048)},
}
STAGE_BLOCKS = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
# Keys: stem 6; 16 blocks of 18 (3 convs, 3 BNs); 4 downsamples of 6; fc 2.
N_KEYS = 6 + 16 * 18 + 4 * 6 + 2  # 320
# torchvision's published parameter counts (with the 1000-class fc): resnet50 25,557,032, resnet18
# 11,689,512. With fc to 512 dims: minus 2048*1000 + 1000, plus 2048*512 + 512.
RESNET50_1000 = 25_557_032
RESNET18_1000 = 11_689_512
RESNET50_512 = RESNET50_1000 - (2048 * 1000 + 1000) + (2048 * 512 + 512)  # 24,557,120


def _shapes(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) + 1:]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix + ".")}


def test_resnet50_layout():
    net = build_backbone(BackboneConfig(arch="resnet50", embedding_dim=512))
    assert isinstance(net, TorchvisionResNet)
    sd = net.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("layer")} == {
        **STEM, "fc.weight": (512, 2048), "fc.bias": (512,)}
    for prefix, table in BLOCKS.items():
        assert _shapes(sd, prefix) == table, prefix
    for stage, n in STAGE_BLOCKS.items():
        assert {k.split(".")[1] for k in sd if k.startswith(stage + ".")} == {str(i) for i in range(n)}
    assert len(sd) == N_KEYS == 320
    assert sum(p.numel() for p in net.parameters()) == RESNET50_512 == 24_557_120


@pytest.mark.parametrize(("arch", "published"), [("resnet18", RESNET18_1000), ("resnet50", RESNET50_1000)])
def test_published_parameter_counts(arch, published):
    net = build_backbone(BackboneConfig(arch=arch, embedding_dim=1000))
    assert sum(p.numel() for p in net.parameters()) == published


def torchvision_resnet18_layout() -> dict[str, tuple[int, ...]]:
    """Every key of torchvision's resnet18 state dict, from its description: BasicBlocks (two 3x3
    convs, the first strided), 2 per stage, downsample where stride or channels change, fc 512->1000."""
    keys = {**STEM}
    cin = 64
    for s, (c, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
        for b in range(2):
            p = f"layer{s + 1}.{b}"
            keys.update({f"{p}.conv1.weight": (c, cin if b == 0 else c, 3, 3), **bn(f"{p}.bn1", c),
                         f"{p}.conv2.weight": (c, c, 3, 3), **bn(f"{p}.bn2", c)})
            if b == 0 and (stride != 1 or cin != c):
                keys.update({f"{p}.downsample.0.weight": (c, cin, 1, 1), **bn(f"{p}.downsample.1", c)})
        cin = c
    return {**keys, "fc.weight": (1000, 512), "fc.bias": (1000,)}


def test_torchvision_resnet18_trunk_loads(tmp_path):
    """A torchvision-layout resnet18 file (ImageNet classifier included) loads into an embedding
    resnet18 with skip=("fc.",): every trunk tensor copied, the embedding fc left as built."""
    layout = torchvision_resnet18_layout()
    assert len(layout) == 6 + 8 * 12 + 3 * 6 + 2  # 122
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randint(0, 100, s, generator=g) if k.endswith("num_batches_tracked")
              else torch.rand(s, generator=g) + 0.5) for k, s in layout.items()}
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(sd, path)
    net = build_backbone(BackboneConfig(arch="resnet18", embedding_dim=128))
    fc_before = net.fc.weight.detach().clone()
    with pytest.raises(FileFormatError, match=r"fc.weight has shape \[1000, 512\].* expects \[128, 512\]"):
        load_backbone_weights(net, path)
    load_backbone_weights(net, path, skip=("fc.",))
    mine = net.state_dict()
    for k, v in sd.items():
        if not k.startswith("fc."):
            assert torch.equal(mine[k], v), k
    assert torch.equal(net.fc.weight, fc_before)
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 128)


def test_any_input_size_and_grey():
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(arch="resnet18", in_channels=1, image_size=[256, 128],
                                        embedding_dim=32)).eval()
    assert net.conv1.weight.shape == (64, 1, 7, 7)
    with torch.no_grad():
        tall = net(torch.randn(2, 1, 256, 128))
        square = net(torch.randn(2, 1, 96, 96))
    assert tall.shape == square.shape == (2, 32)
    assert torch.isfinite(tall).all()


def test_round_trip_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    cfg = BackboneConfig(arch="resnet18", image_size=64, embedding_dim=16, dropout=0.2)
    a = build_backbone(cfg)
    a.train()
    with torch.no_grad():
        a(torch.randn(4, 3, 64, 64))  # moves the BN running statistics away from their init
    torch.save(a.state_dict(), tmp_path / "a.pt")
    b = build_backbone(cfg)
    load_backbone_weights(b, tmp_path / "a.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, layers: tuple[int, ...],
                      bottleneck: bool) -> torch.Tensor:
    """torchvision's ResNet forward in eval mode, restated with torch.nn.functional from its
    description (the stride on the first block of layers 2-4: on conv1 of a BasicBlock, on the 3x3
    conv2 of a Bottleneck), with global average pooling and fc."""

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], False, 0.0, 1e-5)

    x = F.max_pool2d(F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    for s, n in enumerate(layers, 1):
        for b in range(n):
            p, stride = f"layer{s}.{b}", 2 if b == 0 and s > 1 else 1
            if bottleneck:
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
                out = F.relu(bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
                out = bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            else:
                out = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
                out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            x = F.relu(out + x)
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


@pytest.mark.parametrize(("arch", "layers", "bottleneck"), [("resnet18", (2, 2, 2, 2), False),
                                                             ("resnet50", (3, 4, 6, 3), True)])
def test_forward_matches_torchvision_description(arch, layers, bottleneck):
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(arch=arch, image_size=[96, 64], embedding_dim=24, dropout=0.3))
    for m in net.modules():  # random BN statistics, so that every BN's parameters matter
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        got = net.eval()(x)
        ref = reference_forward(net.state_dict(), x, layers, bottleneck)
    assert got.shape == (2, 24)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), (got - ref).abs().max()


def test_gem_pooling_against_the_formula(tmp_path):
    """pool: gem — the pooled vector is (mean x^p)^(1/p) per channel (x clamped to 1e-6), computed
    here in float64 from the trunk's map; p is the learnable ``pool.p`` (3 at first) and gets a
    gradient; a torchvision trunk loads with skip=("fc.", "pool."); avg stays torchvision's."""
    torch.manual_seed(0)
    cfg = BackboneConfig(arch="resnet18", embedding_dim=16, pool="gem")
    net = build_backbone(cfg).eval()
    assert "pool.p" in net.state_dict() and float(net.pool.p.detach()) == 3.0
    assert not hasattr(net, "avgpool")
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        fmap = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
        net.pool.p.fill_(2.5)
        got = net(x)
    m = fmap.double().clamp(min=1e-6)
    pooled = (m ** 2.5).mean(dim=(2, 3)) ** (1 / 2.5)
    want = pooled @ net.fc.weight.double().T + net.fc.bias.double()
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)
    net.train()
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert net.pool.p.grad is not None and torch.isfinite(net.pool.p.grad).all()
    sd = build_backbone(BackboneConfig(arch="resnet18", embedding_dim=16)).state_dict()
    load_backbone_weights(net, sd, skip=("fc.", "pool."))
    assert "pool" not in BackboneConfig(arch="resnet18").model_dump()
    assert BackboneConfig(arch="resnet18", pool="gem").model_dump()["pool"] == "gem"
    with pytest.raises(ValueError, match="pool=gem applies only to resnet18/resnet34/resnet50/resnet101"):
        BackboneConfig(arch="iresnet18", pool="gem")
