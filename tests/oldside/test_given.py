"""Given old features: rows in the data's order or matched by image path; every mismatch named."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bctkit.data.sources.array import ArraySource
from bctkit.errors import DataError, FileFormatError
from bctkit.oldside.given import features_fingerprint, given_features


class Keyed(ArraySource):
    def key(self, i: int) -> str:
        return f"id{int(self.labels[i])}/img{i}.png"


def src(n: int = 6) -> Keyed:
    return Keyed(np.zeros((n, 1, 4, 4), np.uint8), np.arange(n, dtype=np.int64) // 2, "six")


def test_rows_in_order_in_each_format(tmp_path):
    feats = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    np.savez(tmp_path / "f.npz", features=feats)
    save_file({"features": torch.from_numpy(feats)}, str(tmp_path / "f.safetensors"))
    for name in ("f.npy", "f.npz", "f.safetensors"):
        got = given_features(tmp_path / name, src(), 3, "training")
        assert got.dtype == torch.float32 and np.array_equal(got.numpy(), feats), name


def test_rows_matched_by_key_in_any_order(tmp_path):
    s = src()
    feats = np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32)
    perm = np.array([3, 0, 5, 1, 4, 2])
    keys = np.array([s.key(int(i)) for i in perm])
    extra_keys = np.concatenate([keys, ["other/x.png"]])
    extra = np.concatenate([feats[perm], np.ones((1, 3), np.float32)])
    np.savez(tmp_path / "k.npz", features=extra, keys=extra_keys)
    got = given_features(tmp_path / "k.npz", s, 3, "training")
    assert np.array_equal(got.numpy(), feats)


def test_mismatches_are_refused(tmp_path):
    s = src()
    np.save(tmp_path / "short.npy", np.zeros((5, 3), np.float32))
    with pytest.raises(DataError, match=r"short.npy: 5 rows, but the training data has 6 images"):
        given_features(tmp_path / "short.npy", s, 3, "training")
    np.save(tmp_path / "dims.npy", np.zeros((6, 4), np.float32))
    with pytest.raises(DataError, match=r"features have 4 dims; old.backbone.embedding_dim is 3"):
        given_features(tmp_path / "dims.npy", s, 3, "training")
    two = np.zeros((2, 3), np.float32)
    np.savez(tmp_path / "miss.npz", features=two, keys=np.array([s.key(0), s.key(1)]))
    with pytest.raises(DataError, match=r"no features for 4 of 6 images, e.g. \['id1/img2.png'"):
        given_features(tmp_path / "miss.npz", s, 3, "training")
    np.savez(tmp_path / "dup.npz", features=two, keys=np.array([s.key(0), s.key(0)]))
    with pytest.raises(DataError, match=r"key 'id0/img0.png' is given twice \(rows 0 and 1\)"):
        given_features(tmp_path / "dup.npz", s, 3, "training")
    np.save(tmp_path / "int.npy", np.zeros((6, 3), np.int64))
    with pytest.raises(FileFormatError, match=r"int.npy: features are int64 \[6, 3\]; expected float"):
        given_features(tmp_path / "int.npy", s, 3, "training")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 6, dtype=object))
    with pytest.raises(FileFormatError, match="obj.npy: not a readable features file"):
        given_features(tmp_path / "obj.npy", s, 3, "training")
    (tmp_path / "f.csv").write_text("1,2,3\n")
    with pytest.raises(FileFormatError, match="unknown features format"):
        given_features(tmp_path / "f.csv", s, 3, "training")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_name_the_image(tmp_path, bad):
    feats = np.zeros((6, 3), np.float32)
    feats[4, 2] = bad
    np.save(tmp_path / "n.npy", feats)
    with pytest.raises(DataError, match=r"n.npy: the features of evaluation image 4 .* are not finite"):
        given_features(tmp_path / "n.npy", src(), 3, "evaluation")


def test_fingerprint_depends_on_every_value():
    a, b = torch.zeros(4, 3), torch.zeros(4, 3)
    assert features_fingerprint(a, b) == features_fingerprint(a.clone(), b.clone())
    b[3, 2] = 1e-7
    assert features_fingerprint(a, b) != features_fingerprint(a, torch.zeros(4, 3))
