"""gldv2: train_clean.csv expanded to train/a/b/c/<id>.jpg, landmark ids remapped to 0..L-1 in
increasing order, a cached parse keyed by root, errors naming file:line."""

import numpy as np
import pytest

from bctkit.data.sources import ListSource
from bctkit.data.sources.gldv2 import GLDv2Source
from bctkit.errors import DataError

from .conftest import decoded

ROWS = [(1002, ["b1e2f3a4c5d6e7f8", "00aa11bb22cc33dd"]), (7, ["fedcba9876543210"]),
        (138982, ["0123456789abcdef", "abc0000000000001", "9f9f9f9f9f9f9f9f"])]


def _csv(path, rows, header=True):
    lines = (["landmark_id,images"] if header else []) + [f"{lm},{' '.join(ids)}" for lm, ids in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def gld(tmp_path, items):
    root = tmp_path / "gldv2"
    k = 0
    for _, ids in ROWS:
        for image_id in ids:
            path = root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(items[k][2])
            k += 1
    _csv(root / "train_clean.csv", ROWS)
    return root


def test_clean_csv(gld, items):
    src = GLDv2Source(gld)
    # landmarks 7 < 1002 < 138982 -> 0, 1, 2; images in the csv's order
    assert src.labels.tolist() == [1, 1, 0, 2, 2, 2]
    assert [src.label_name(k) for k in range(3)] == ["7", "1002", "138982"]
    assert src.key(3) == "train/0/1/2/0123456789abcdef.jpg"
    assert np.array_equal(src.decode(3), decoded(items[3][2]))
    assert not src.from_cache and GLDv2Source(gld, gld / "train_clean.csv").from_cache


def test_the_list_form_is_the_list_source_with_root(gld, tmp_path, items):
    """The UniBCT / OpenCompatible list of GLDv2: paths relative to the dataset root."""
    lst = tmp_path / "gldv2_train.txt"
    lst.write_text("train/0/1/2/0123456789abcdef.jpg 2\ntrain/f/e/d/fedcba9876543210.jpg 0\n")
    src = ListSource(lst, root=gld)
    assert src.labels.tolist() == [2, 0] and np.array_equal(src.decode(0), decoded(items[3][2]))


def test_root_is_part_of_the_cache_key(gld, tmp_path):
    csv = _csv(tmp_path / "clean.csv", ROWS[1:2])
    GLDv2Source(gld, csv)
    other = tmp_path / "other"
    (other / "train").mkdir(parents=True)
    missing = r"clean\.csv:2: .*other/train/f/e/d/fedcba9876543210\.jpg: image file not found"
    with pytest.raises(DataError, match=missing):
        GLDv2Source(other, csv)


@pytest.mark.parametrize(("row", "message"), [
    ("55,", r"train_clean\.csv:5: landmark 55 has no images"),
    ("x1,0123456789abcdee", r"train_clean\.csv:5: landmark id 'x1' is not a non-negative integer"),
    ("-4,0123456789abcdee", r"train_clean\.csv:5: landmark id '-4' is not a non-negative integer"),
    ("55,0123456789abcdee", r"train_clean\.csv:5: .*train/0/1/2/0123456789abcdee\.jpg: image file not found"),
    ("55,ab", r"train_clean\.csv:5: image id 'ab' is not 3 or more letters and digits"),
    ("55,../../x", r"train_clean\.csv:5: image id '\.\./\.\./x'"),
    ("7,0123456789abcdee", r"train_clean\.csv:5: landmark 7 is listed again \(first on line 3\)"),
    ("55,fedcba9876543210",
     r"train_clean\.csv:5: image fedcba9876543210 is listed again \(first on line 3\)"),
])
def test_errors_name_the_line(gld, row, message):
    text = (gld / "train_clean.csv").read_text()
    (gld / "train_clean.csv").write_text(text + row + "\n")
    with pytest.raises(DataError, match=message) as err:
        GLDv2Source(gld)
    assert "\n" not in str(err.value)


def test_missing_things(gld, tmp_path):
    with pytest.raises(DataError, match=r"nope: no train/ folder"):
        GLDv2Source(tmp_path / "nope")
    with pytest.raises(DataError, match=r"none\.csv: not found \(gldv2\.csv"):
        GLDv2Source(gld, tmp_path / "none.csv")
    with pytest.raises(DataError, match=r"empty\.csv: no 'landmark_id,images' rows"):
        GLDv2Source(gld, _csv(tmp_path / "empty.csv", []))
