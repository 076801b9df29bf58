"""The old classifier from files: arcface_torch's Partial FC shards merged by their class ranges,
and the map from training classes to its rows."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bctkit.data.sources.array import ArraySource
from bctkit.errors import ConfigError, FileFormatError
from bctkit.oldside.classifier import class_rows, load_classifier, shard_rows
from bctkit.oldside.config import ClassifierConfig


def arcface_ranges(total: int, world: int) -> list[tuple[int, int]]:
    """(start, count) per rank as arcface_torch's PartialFC computes them (written from its rule:
    num_local = total // world + (rank < total % world), class_start = total // world * rank +
    min(rank, total % world))."""
    out = []
    for rank in range(world):
        count = total // world + (1 if rank < total % world else 0)
        start = total // world * rank + min(rank, total % world)
        out.append((start, count))
    return out


@pytest.mark.parametrize("total,world", [(10, 3), (12, 4), (7, 8), (1000003, 8)])
def test_shard_rows_follow_partial_fc(total, world):
    ranges = arcface_ranges(total, world)
    assert [shard_rows(total, world, r) for r in range(world)] == [c for _, c in ranges]
    assert all(s + c == ranges[i + 1][0] for i, (s, c) in enumerate(ranges[:-1]))


def shards(tmp_path, full: torch.Tensor, world: int) -> list[str]:
    paths = []
    for rank, (start, count) in enumerate(arcface_ranges(len(full), world)):
        p = tmp_path / f"softmax_fc_gpu_{rank}.pt"
        torch.save({"weight": full[start:start + count].clone()}, p)
        paths.append(str(p))
    return paths


def test_partial_fc_shards_merge_to_the_full_matrix(tmp_path):
    full = torch.randn(10, 6)
    paths = shards(tmp_path, full, 3)
    got = load_classifier(ClassifierConfig(weights=paths, label_map="identity"), 6)
    assert torch.equal(got, full)
    with pytest.raises(FileFormatError, match=r"softmax_fc_gpu_1.pt: shard 0 of 3 holds 3 classes.*rank 0 4"):
        load_classifier(ClassifierConfig(weights=[paths[1], paths[0], paths[2]], label_map="identity"), 6)
    assert len(load_classifier(ClassifierConfig(weights=paths[:2], label_map="identity"), 6)) == 7
    with pytest.raises(FileFormatError, match=r"2 file\(s\) hold 7 classes; .*num_classes is 10"):
        load_classifier(ClassifierConfig(weights=paths[:2], label_map="identity", num_classes=10), 6)


def test_raw_tensor_shards_of_older_arcface_torch(tmp_path):
    """Older arcface_torch saved each rank's Partial FC weight as one bare tensor
    (``rank_{r}_softmax_weight.pt``): read as data only (weights_only) and merged like dict shards."""
    full = torch.randn(10, 6)
    paths = []
    for rank, (start, count) in enumerate(arcface_ranges(len(full), 3)):
        paths.append(str(tmp_path / f"rank_{rank}_softmax_weight.pt"))
        torch.save(full[start:start + count].clone(), paths[-1])
    got = load_classifier(ClassifierConfig(weights=paths, label_map="identity"), 6)
    assert torch.equal(got, full)
    torch.save(torch.zeros(4, dtype=torch.int64), tmp_path / "ints.pt")
    with pytest.raises(FileFormatError, match=r"ints.pt: 'weight' is torch.int64 \[4\]; expected a float"):
        load_classifier(ClassifierConfig(weights=str(tmp_path / "ints.pt"), label_map="identity"), 4)
    torch.save([torch.zeros(2, 4)], tmp_path / "list.pt")
    with pytest.raises(FileFormatError, match=r"list.pt: holds a list, not a state dict"):
        load_classifier(ClassifierConfig(weights=str(tmp_path / "list.pt"), label_map="identity"), 4)


def test_one_matrix_in_each_format(tmp_path):
    full = torch.randn(5, 4)
    np.save(tmp_path / "w.npy", full.numpy())
    save_file({"weight": full}, str(tmp_path / "w.safetensors"))
    torch.save({"weight": full}, tmp_path / "w.pth")
    for name in ("w.npy", "w.safetensors", "w.pth"):
        got = load_classifier(ClassifierConfig(weights=str(tmp_path / name), label_map="identity"), 4)
        assert torch.equal(got, full), name


def test_bad_classifiers_are_named(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((5, 3), np.float32))
    with pytest.raises(FileFormatError, match=r"d.npy: classifier rows have 3 dims; .* embedding has 4"):
        load_classifier(ClassifierConfig(weights=str(tmp_path / "d.npy"), label_map="identity"), 4)
    bad = np.zeros((5, 4), np.float32)
    bad[3, 1] = np.nan
    np.save(tmp_path / "n.npy", bad)
    with pytest.raises(FileFormatError, match="row 3 of the classifier is not finite"):
        load_classifier(ClassifierConfig(weights=str(tmp_path / "n.npy"), label_map="identity"), 4)
    np.save(tmp_path / "v.npy", np.zeros(5, np.float32))
    with pytest.raises(FileFormatError, match=r"v.npy: 'weight' is torch.float32 \[5\]; expected a float"):
        load_classifier(ClassifierConfig(weights=str(tmp_path / "v.npy"), label_map="identity"), 4)
    torch.save({"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}, tmp_path / "two.pt")
    with pytest.raises(FileFormatError, match=r"two.pt: holds \['a', 'b'\]"):
        load_classifier(ClassifierConfig(weights=str(tmp_path / "two.pt"), label_map="identity"), 4)


class Code:
    """Anything a plain state dict cannot hold: unpickling it would run code."""

    def __reduce__(self):
        return (print, ("ran",))


def test_a_pickle_of_objects_is_refused_not_run(tmp_path, capsys):
    torch.save({"weight": Code()}, tmp_path / "evil.pt")
    with pytest.raises(FileFormatError, match="evil.pt"):
        load_classifier(ClassifierConfig(weights=str(tmp_path / "evil.pt"), label_map="identity"), 4)
    assert "ran" not in capsys.readouterr().out


def source(names: list[str]) -> ArraySource:
    class Named(ArraySource):
        def label_name(self, label: int) -> str:
            return names[label]

    labels = np.arange(len(names), dtype=np.int64)
    return Named(np.zeros((len(names), 1, 4, 4), np.uint8), labels, "named")


def test_class_rows_identity_list_and_names(tmp_path):
    src = source(["ann", "bob", "cy"])
    assert class_rows("identity", src, 3).tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"identity needs as many classifier rows \(5\) as the training "
                                          r"data has class ids \(3\)"):
        class_rows("identity", src, 5)
    (tmp_path / "l.json").write_text(json.dumps([4, None, 0]))
    assert class_rows(str(tmp_path / "l.json"), src, 5).tolist() == [4, -1, 0]
    (tmp_path / "d.json").write_text(json.dumps({"cy": 2, "ann": 7}))
    assert class_rows(str(tmp_path / "d.json"), src, 8).tolist() == [7, -1, 2]


@pytest.mark.parametrize("content,match", [
    ([1, 2], r"2 entries; the training data has 3 class ids"),
    ([0, 5, 1], r"entry 1: 5 is not a row of the 5-class old classifier"),
    ([0, True, 1], r"entry 1: True is not a row"),
    ({"dan": 1}, r"1 class name\(s\) not in the training data, e.g. \['dan'\]"),
    ([0, 1, 1], r"classifier row 1 is given to more than one training class"),
    ("ann", r"expected a JSON list"),
])
def test_bad_label_maps_are_named(tmp_path, content, match):
    (tmp_path / "m.json").write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=match):
        class_rows(str(tmp_path / "m.json"), source(["ann", "bob", "cy"]), 5)


def test_class_rows_of_a_pool_with_held_out_identities(tmp_path):
    """A seeded test split leaves the pool's class ids gappy (ids 1 and 4 held out here): a map is
    given over the dataset's class ids, and each training class, in order of its id, gets its row."""
    dataset = source(["a", "b", "c", "d", "e", "f"])
    pool = dataset.subset(np.array([0, 2, 3, 5]))
    assert class_rows("identity", pool, 6).tolist() == [0, 2, 3, 5]
    with pytest.raises(ConfigError, match=r"identity needs as many classifier rows \(4\) as the training "
                                          r"data has class ids \(6\)"):
        class_rows("identity", pool, 4)
    (tmp_path / "l.json").write_text(json.dumps([5, 4, 3, 2, 1, None]))
    assert class_rows(str(tmp_path / "l.json"), pool, 6).tolist() == [5, 3, 2, -1]
    (tmp_path / "d.json").write_text(json.dumps({"b": 1, "c": 0, "f": 4}))  # b is held out
    assert class_rows(str(tmp_path / "d.json"), pool, 6).tolist() == [-1, 0, -1, 4]
    renumbered = pool.subset(None, np.arange(4))  # the pool as upgrade mode trains on it
    assert class_rows("identity", renumbered, 6, np.array([0, 2, 3, 5])).tolist() == [0, 2, 3, 5]
