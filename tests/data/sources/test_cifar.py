"""cifar: both variants in both forms, pixels and labels as the files lay them out, one-line errors
naming the file (and record), pickles that name anything else refused and never run."""

import os
import pickle

import numpy as np
import pytest
from pydantic import ValidationError

from bctkit.data.sources.cifar import CifarConfig, CifarSource
from bctkit.errors import ConfigError, DataError, FileFormatError
from bctkit.storage.safe_pickle import UnsafePickleError

from .cifar_files import CIFAR10_NAMES, dump, make_splits, write_binary, write_python


def _same(src, split):
    assert src.stored_shape() == (3, 32, 32) and len(src) == len(split.fine)
    chw = split.chw()
    for i in range(len(src)):
        assert src.decode(i).dtype == np.uint8 and np.array_equal(src.decode(i), chw[i])
    idx = np.array([2, 0, len(src) - 1])
    assert src.reads_batches and np.array_equal(src.read_many(idx), chw[idx])


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_binary(tmp_path, split):
    splits = make_splits("cifar10")
    folder = write_binary(tmp_path, "cifar10", splits)
    src = CifarSource(tmp_path, split=split)
    assert (src.variant, src.form, src.folder) == ("cifar10", "binary", folder)
    assert src.labels.tolist() == splits[split].fine.tolist()
    _same(src, splits[split])
    assert src.label_name(int(src.labels[0])) == "truck" and src.name == f"CIFAR-10 {split}"
    if split == "train":  # 10 images over 5 batch files: 2 each
        assert src.describe(5) == f"{folder / 'data_batch_3.bin'} record 1"
    same = CifarSource(folder, split=split)  # root may be the dataset folder itself
    assert same.fingerprint() == src.fingerprint()


@pytest.mark.parametrize("labels", ["fine", "coarse"])
def test_cifar100_binary(tmp_path, labels):
    splits = make_splits("cifar100")
    write_binary(tmp_path, "cifar100", splits)
    src = CifarSource(tmp_path, variant="cifar100", labels=labels, split="train")
    assert src.labels.tolist() == getattr(splits["train"], labels).tolist()
    _same(src, splits["train"])
    assert src.label_name(3) == f"{labels}3" and src.label_name(500) == "500"


@pytest.mark.parametrize("how", [2, 4, 5, "py2", "bytes-keys"])
def test_cifar10_python(tmp_path, how):
    splits = make_splits("cifar10")
    write_python(tmp_path, "cifar10", splits, how=how)
    src = CifarSource(tmp_path, split="train")
    assert src.form == "python" and src.labels.tolist() == splits["train"].fine.tolist()
    _same(src, splits["train"])
    assert [src.label_name(k) for k in range(10)] == CIFAR10_NAMES


@pytest.mark.parametrize("how", ["py2", "bytes-keys", 3])
@pytest.mark.parametrize("labels", ["fine", "coarse"])
def test_cifar100_python(tmp_path, how, labels):
    splits = make_splits("cifar100")
    write_python(tmp_path, "cifar100", splits, how=how)
    src = CifarSource(tmp_path / "cifar-100-python", labels=labels, split="test")
    assert src.labels.tolist() == getattr(splits["test"], labels).tolist()
    _same(src, splits["test"])
    assert src.label_name(19) == f"{labels}19"


def test_forms_agree_and_auto_prefers_binary(tmp_path):
    splits = make_splits("cifar10")
    write_binary(tmp_path, "cifar10", splits)
    write_python(tmp_path, "cifar10", splits, how="py2", meta=False)
    auto = CifarSource(tmp_path, split="test")
    py = CifarSource(tmp_path, form="python", split="test")
    assert (auto.form, py.form) == ("binary", "python")
    assert auto.fingerprint() == py.fingerprint()  # the same images and labels, whichever files
    assert py.label_name(3) == "3"  # no meta file: the number
    assert CifarSource(tmp_path, split="train").fingerprint() != auto.fingerprint()


def test_config():
    cfg = CifarConfig(root="/d", split="test")
    assert (cfg.variant, cfg.form, cfg.labels) == ("auto", "auto", "fine")
    with pytest.raises(ValidationError, match="coarse needs variant cifar100"):
        CifarConfig(root="/d", variant="cifar10", labels="coarse")
    with pytest.raises(ValidationError, match="extra"):
        CifarConfig(root="/d", folder="x")


def test_where_is_the_dataset(tmp_path):
    with pytest.raises(DataError, match=r"nope: CIFAR folder not found"):
        CifarSource(tmp_path / "nope")
    with pytest.raises(DataError, match=r"no CIFAR-10 or CIFAR-100 found: expected cifar-10-batches-bin/ "
                                        r"\(test_batch\.bin \.\.\.\) or .*cifar-100-python/ \(test"):
        CifarSource(tmp_path)
    write_binary(tmp_path, "cifar10", make_splits("cifar10"))
    with pytest.raises(DataError, match=r"no CIFAR-100 found: .*; it holds the CIFAR-10 binary form"):
        CifarSource(tmp_path, variant="cifar100")
    with pytest.raises(DataError, match=r"no CIFAR-10 or CIFAR-100 python form found"):
        CifarSource(tmp_path, form="python")
    with pytest.raises(ConfigError, match="is CIFAR-10, which has no coarse labels"):
        CifarSource(tmp_path, labels="coarse")
    write_binary(tmp_path, "cifar100", make_splits("cifar100"))
    with pytest.raises(DataError, match="holds both CIFAR-10 and CIFAR-100; set cifar.variant"):
        CifarSource(tmp_path)
    (tmp_path / "cifar-10-batches-bin" / "data_batch_4.bin").unlink()
    with pytest.raises(DataError, match=r"data_batch_4\.bin: not found; the CIFAR-10 binary train split is "
                                        r"data_batch_1\.bin \+ .* \+ data_batch_5\.bin in"):
        CifarSource(tmp_path, variant="cifar10")


def _one_line(exc_info, *parts):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, msg


def test_binary_errors(tmp_path):
    folder = write_binary(tmp_path, "cifar10", make_splits("cifar10"))
    path = folder / "test_batch.bin"
    good = path.read_bytes()
    path.write_bytes(good[:-100])
    with pytest.raises(FileFormatError) as err:
        CifarSource(folder, split="test")
    _one_line(err, str(path), "9119 bytes is not a whole number of 3073-byte records",
              "(2 records and 2973 bytes over)")
    bad = bytearray(good)
    bad[2 * 3073] = 10  # record 2's label
    path.write_bytes(bytes(bad))
    with pytest.raises(DataError) as err:
        CifarSource(folder, split="test")
    _one_line(err, f"{path}: record 2: label 10 is out of range (0..9)")
    path.write_bytes(b"")
    with pytest.raises(FileFormatError, match="0 bytes is not a whole number"):
        CifarSource(folder, split="test")


@pytest.mark.parametrize(("column", "value", "message"), [
    (0, 20, "record 1: coarse label 20 is out of range (0..19)"),
    (1, 100, "record 1: fine label 100 is out of range (0..99)"),
])
def test_cifar100_label_bytes(tmp_path, column, value, message):
    folder = write_binary(tmp_path, "cifar100", make_splits("cifar100"))
    path = folder / "test.bin"
    bad = bytearray(path.read_bytes())
    bad[3074 + column] = value
    path.write_bytes(bytes(bad))
    with pytest.raises(DataError) as err:
        CifarSource(folder, labels="coarse", split="test")  # both label bytes are checked
    _one_line(err, f"{path}: {message}")


@pytest.mark.parametrize(("change", "message"), [
    (lambda b: b.pop("data"), "the batch has no 'data'"),
    (lambda b: b.pop("labels"), "the batch has no 'labels'"),
    (lambda b: b.update(data=b["data"].reshape(-1, 3, 32, 32)),
     "'data' must be uint8 [N, 3072], got uint8 [1, 3, 32, 32]"),
    (lambda b: b.update(data=b["data"].astype(np.float32)), "'data' must be uint8 [N, 3072], got float32"),
    (lambda b: b.update(data=b["data"][:0]), "'data' holds no images"),
    (lambda b: b.update(labels=b["labels"] + [1]), "2 'labels' for 1 images in 'data'"),
    (lambda b: b.update(labels=[0.5]), "'labels' must be a list of integers"),
    (lambda b: b.update(labels=[12]), "record 0: labels 12 is out of range (0..9)"),
])
def test_python_errors(tmp_path, change, message):
    folder = write_python(tmp_path, "cifar10", make_splits("cifar10", train=5))
    batch = {"data": np.zeros((1, 3072), np.uint8), "labels": [3]}
    change(batch)
    path = folder / "data_batch_2"
    path.write_bytes(dump(batch, 4))
    with pytest.raises((DataError, FileFormatError)) as err:
        CifarSource(folder)
    _one_line(err, f"{path}: {message}")


def test_not_a_dict_and_truncated(tmp_path):
    folder = write_python(tmp_path, "cifar10", make_splits("cifar10"))
    (folder / "test_batch").write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(FileFormatError, match=r"test_batch: expected a pickled dict, got list"):
        CifarSource(folder, split="test")
    path = folder / "data_batch_1"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(FileFormatError) as err:
        CifarSource(folder)
    _one_line(err, f"{path}: ")


class _Touch:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["test_batch", "batches.meta"])
def test_pickle_naming_a_global_is_refused_and_not_run(tmp_path, where):
    folder = write_python(tmp_path, "cifar10", make_splits("cifar10"))
    marker = tmp_path / "ran"
    evil = {"data": np.zeros((1, 3072), np.uint8), "labels": [1], "label_names": CIFAR10_NAMES,
            "x": _Touch(marker)}
    (folder / where).write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(UnsafePickleError) as err:
        CifarSource(folder, split="test")
    _one_line(err, f"{folder / where}: refused, the pickle names ", "system")
    assert not marker.exists()


def test_meta_with_the_wrong_count(tmp_path):
    folder = write_binary(tmp_path, "cifar10", make_splits("cifar10"))
    (folder / "batches.meta.txt").write_text("a\nb\n")
    with pytest.raises(FileFormatError, match=r"batches\.meta\.txt: 2 class names, expected 10"):
        CifarSource(folder)
