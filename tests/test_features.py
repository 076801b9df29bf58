"""Extraction (batched, inference mode, flip test) and feature files."""

import numpy as np
import pytest
import torch

from bctkit.errors import DataError, FileFormatError
from bctkit.features import FeatureSet, extract, load_features
from bctkit.models import BackboneConfig, build_backbone


def test_extract_batches_and_flip():
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(arch="r8", width=4, embedding_dim=8, image_size=16))
    imgs = np.random.default_rng(0).integers(0, 256, (11, 1, 16, 16), dtype=np.uint8)
    net.train()
    a = extract(net, imgs, batch_size=4, progress=False)
    assert net.training
    net.eval()
    x = torch.from_numpy(imgs).float() / 127.5 - 1
    with torch.no_grad():
        assert torch.allclose(a, net(x), atol=1e-5)
        flipped = extract(net, imgs, batch_size=5, flip=True, progress=False)
        assert torch.allclose(flipped, net(x) + net(x.flip(3)), atol=1e-5)


def test_feature_file_roundtrip_and_errors(tmp_path):
    fs = FeatureSet(torch.randn(5, 3), torch.arange(5), {"compat_dims": 2})
    fs.save(tmp_path / "f.safetensors")
    back = load_features(tmp_path / "f.safetensors")
    assert torch.equal(back.feats, fs.feats) and back.compat_dims == 2
    bad = FeatureSet(torch.tensor([[0.0, float("nan")]]), torch.arange(1), {})
    bad.save(tmp_path / "nan.safetensors")
    with pytest.raises(DataError, match="NaN"):
        load_features(tmp_path / "nan.safetensors")
    data = (tmp_path / "f.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="cut.safetensors"):
        load_features(tmp_path / "cut.safetensors")
