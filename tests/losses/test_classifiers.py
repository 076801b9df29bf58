"""Loading old classifiers (.npy / .safetensors) and merging per-rank shards."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bctkit.errors import DataError, FileFormatError
from bctkit.losses.classifiers import load_classifier, merge_classifier_shards


def test_load_npy_and_safetensors(tmp_path):
    w = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    assert torch.equal(load_classifier(tmp_path / "w.npy"), torch.from_numpy(w))
    np.save(tmp_path / "w64.npy", w.astype(np.float64))
    got = load_classifier(tmp_path / "w64.npy")
    assert got.dtype == torch.float32 and torch.allclose(got, torch.from_numpy(w))

    t = torch.from_numpy(w)
    save_file({"weight": t, "bias": torch.zeros(5)}, str(tmp_path / "named.safetensors"))
    save_file({"fc7": t}, str(tmp_path / "only.safetensors"))
    save_file({"a": t.clone(), "b": t.clone()}, str(tmp_path / "two.safetensors"))
    assert torch.equal(load_classifier(tmp_path / "named.safetensors"), t)
    assert torch.equal(load_classifier(tmp_path / "only.safetensors"), t)
    assert torch.equal(load_classifier(tmp_path / "two.safetensors", key="b"), t)
    with pytest.raises(FileFormatError, match="key="):
        load_classifier(tmp_path / "two.safetensors")
    with pytest.raises(FileFormatError, match="no tensor 'c'"):
        load_classifier(tmp_path / "two.safetensors", key="c")


def test_load_errors(tmp_path):
    with pytest.raises(FileFormatError, match="not found"):
        load_classifier(tmp_path / "missing.npy")
    np.save(tmp_path / "v.npy", np.zeros(4, np.float32))
    with pytest.raises(DataError, match="2-D"):
        load_classifier(tmp_path / "v.npy")
    bad = np.ones((3, 2), np.float32)
    bad[1, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match="row 1 contains NaN"):
        load_classifier(tmp_path / "nan.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FileFormatError, match="obj.npy"):
        load_classifier(tmp_path / "obj.npy")
    np.save(tmp_path / "int.npy", np.ones((2, 2), np.int64))
    with pytest.raises(DataError, match="floating"):
        load_classifier(tmp_path / "int.npy")
    full = tmp_path / "w.npy"
    np.save(full, np.ones((100, 8), np.float32))
    (tmp_path / "cut.npy").write_bytes(full.read_bytes()[:300])
    with pytest.raises(FileFormatError, match="cut.npy"):
        load_classifier(tmp_path / "cut.npy")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FileFormatError, match="junk.safetensors"):
        load_classifier(tmp_path / "junk.safetensors")
    (tmp_path / "w.txt").write_text("1 2")
    with pytest.raises(FileFormatError, match=".npy or .safetensors"):
        load_classifier(tmp_path / "w.txt")


def test_merge_shards_in_rank_order(tmp_path):
    full = torch.randn(11, 4)
    # insightface partial FC over 3 ranks: 11 = 4 + 4 + 3, contiguous blocks in rank order
    blocks = [full[:4], full[4:8], full[8:]]
    paths = []
    for r, b in enumerate(blocks):
        paths.append(tmp_path / f"rank_{r}_softmax_weight.npy")
        np.save(paths[-1], b.numpy())
    assert torch.equal(merge_classifier_shards(paths, num_classes=11), full)
    assert torch.equal(merge_classifier_shards([blocks[0], blocks[1].numpy(), paths[2]]), full)
    with pytest.raises(DataError, match="rank order"):
        merge_classifier_shards([paths[1], paths[0], paths[2]])
    with pytest.raises(DataError, match="num_classes=12"):
        merge_classifier_shards(paths, num_classes=12)
    with pytest.raises(DataError, match="shard 1 has embedding dim 5; expected 4"):
        merge_classifier_shards([blocks[0], torch.randn(3, 5)])
    with pytest.raises(DataError, match="none"):
        merge_classifier_shards([])
