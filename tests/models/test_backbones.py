"""Backbones: shapes for every depth and channel count; the frozen BN scale; the model store."""

import pytest
import torch

from bctkit.errors import FileFormatError
from bctkit.models import BackboneConfig, HeadConfig, build_backbone, build_head
from bctkit.models.small_resnet import DEPTHS
from bctkit.models.store import fingerprint, load_model, save_model


@pytest.mark.parametrize("arch", sorted(DEPTHS))
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(arch, channels):
    cfg = BackboneConfig(arch=arch, width=8, in_channels=channels, image_size=32, embedding_dim=24)
    net = build_backbone(cfg).eval()
    assert net(torch.randn(3, channels, 32, 32)).shape == (3, 24)
    assert not net.features.weight.requires_grad


def test_store_roundtrip_and_fingerprint(tmp_path):
    cfg = BackboneConfig(arch="r8", width=8, embedding_dim=16)
    net, hcfg = build_backbone(cfg), HeadConfig(type="cosface")
    head = build_head(hcfg, 16, 7)
    fp = save_model(tmp_path / "m.safetensors", net, head, hcfg, {"name": "x"})
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.fingerprint == fp == fingerprint(net)
    assert not any(p.requires_grad for p in loaded.backbone.parameters())
    assert not loaded.backbone.training
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(loaded.backbone(x), net.eval()(x))
    with torch.no_grad():
        net.fc.weight.add_(1e-3)
    assert fingerprint(net) != fp


def test_corrupt_model_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(FileFormatError, match="m.safetensors"):
        load_model(path)
