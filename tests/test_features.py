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


def test_feature_file_without_rows_is_refused(tmp_path):
    FeatureSet(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), {}).save(tmp_path / "empty.safetensors")
    with pytest.raises(DataError, match=r"empty\.safetensors: .*no rows"):
        load_features(tmp_path / "empty.safetensors")
    FeatureSet(torch.zeros(4, 0), torch.arange(4), {}).save(tmp_path / "flat.safetensors")
    with pytest.raises(DataError, match=r"flat\.safetensors: .*no feature dimensions"):
        load_features(tmp_path / "flat.safetensors")


@pytest.mark.parametrize("labels", [torch.tensor([0.0, 1.5, 2.0]), torch.tensor([0.0, 1.0, 2.0]),
                                    torch.tensor([0, 1, 2], dtype=torch.float16)])
def test_float_labels_are_refused(tmp_path, labels):
    """Any floating-point label tensor is refused, even with integral values: a float label may
    already have been rounded (float32 holds integers exactly only up to 2**24)."""
    FeatureSet(torch.randn(3, 2), labels, {}).save(tmp_path / "float.safetensors")
    with pytest.raises(DataError, match=r"float\.safetensors: labels are .*float.*integer"):
        load_features(tmp_path / "float.safetensors")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_integer_labels_of_any_width_load(tmp_path, dtype):
    FeatureSet(torch.randn(3, 2), torch.tensor([2, 0, 1], dtype=dtype), {}).save(tmp_path / "i.safetensors")
    back = load_features(tmp_path / "i.safetensors")
    assert back.labels.dtype == torch.long and back.labels.tolist() == [2, 0, 1]
