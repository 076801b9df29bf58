"""The transformation h: FCT's layout, its file (fingerprint, version) and what loading refuses."""

import json

import numpy as np
import pytest
import torch

from bctkit.errors import DataError, FileFormatError
from bctkit.models.transformation import (
    Transformation,
    TransformationConfig,
    composed_fingerprint,
    load_transformation,
    save_transformation,
)
from bctkit.storage import load_tensors, save_tensors


def _net(side_dim=0, uncertainty=True):
    torch.manual_seed(0)
    h = Transformation(TransformationConfig(old_dim=6, new_dim=5, side_dim=side_dim, inner_dim=16,
                                            uncertainty=uncertainty))
    return h.eval()


def test_fct_layout_and_outputs():
    h = _net(side_dim=3)
    names = set(h.state_dict())
    # FCT's MLP_BN_SIDE_PROJECTION module names: p1 (old), p2 (side), mixer; conv + normalizer blocks
    assert {"p1.0.conv.weight", "p1.1.normalizer.running_mean", "p2.0.conv.weight",
            "mixer.2.conv.bias"} <= names
    assert h.p1[0].conv.weight.shape == (12, 6) and h.p1[1].conv.weight.shape == (10, 12)
    assert h.p2[1].conv.weight.shape == (10, 6) and h.mixer[0].conv.weight.shape == (16, 20)
    assert h.mixer[2].conv.weight.shape == (6, 16)  # 5 coordinates + log sigma^2
    y, lv = h(torch.randn(4, 6), torch.randn(4, 3))
    assert y.shape == (4, 5) and lv.shape == (4,)
    with pytest.raises(DataError, match="side information"):
        h(torch.randn(4, 6))
    y, lv = _net(uncertainty=False)(torch.randn(4, 6))
    assert y.shape == (4, 5) and lv is None


def test_apply_matches_the_network_and_refuses_other_widths(tmp_path):
    h = _net()
    save_transformation(tmp_path / "transform.safetensors", h, {"old_fingerprint": "aaaa",
                                                               "new_fingerprint": "bbbb"})
    loaded = load_transformation(tmp_path)  # a folder reads its transform.safetensors
    x = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)
    y, lv = loaded.apply(x, batch_size=4)
    with torch.no_grad():
        ref_y, ref_lv = h(torch.from_numpy(x))
    np.testing.assert_allclose(y, ref_y.numpy(), rtol=1e-5, atol=1e-6)  # batches of 4 vs one of 10
    np.testing.assert_allclose(lv, ref_lv.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match=r"expected old vectors \[N, 6\], got \[10, 7\]"):
        loaded.apply(np.zeros((10, 7), np.float32))


def test_version_is_h_composed_with_the_old_model(tmp_path):
    h = _net()
    fp = save_transformation(tmp_path / "transform.safetensors", h,
                             {"old_fingerprint": "0123456789abcdef", "new_fingerprint": "x"})
    loaded = load_transformation(tmp_path / "transform.safetensors")
    assert loaded.fingerprint == fp and loaded.old_fingerprint == "0123456789abcdef"
    assert loaded.version == composed_fingerprint(fp, "0123456789abcdef") != fp
    assert composed_fingerprint(fp, "0123456789abcdee") != loaded.version
    assert json.loads((tmp_path / "transform.json").read_text())["version"] == loaded.version


def test_refuses_edited_weights_and_other_files(tmp_path):
    path = tmp_path / "t.safetensors"
    save_transformation(path, _net(), {"old_fingerprint": "aaaa", "new_fingerprint": "bbbb"})
    tensors, meta = load_tensors(path)
    tensors["mixer.2.conv.bias"] = tensors["mixer.2.conv.bias"] + 1
    save_tensors(path, tensors, meta)
    with pytest.raises(FileFormatError, match="do not match the fingerprint"):
        load_transformation(path)
    save_tensors(path, {"x": torch.zeros(1)}, {"name": "a model"})
    with pytest.raises(FileFormatError, match="not a bctkit transformation file"):
        load_transformation(path)
