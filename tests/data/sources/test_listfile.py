"""list: 'path label' lines (text or CSV), labels as given, a cached parse, errors naming file:line."""

import os
import time

import numpy as np
import pytest

from bctkit.data.sources import ListSource
from bctkit.errors import DataError

from .conftest import decoded, write_folder


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_text_list(tmp_path, items):
    write_folder(tmp_path / "imgs", items)
    (tmp_path / "imgs" / "with space").mkdir()
    (tmp_path / "imgs" / "with space" / "a b.png").write_bytes(items[0][2])
    lines = ["# comment", "", "imgs/id01/img1.jpg 17", "imgs/with space/a b.png\t5",
             f"{tmp_path / 'imgs' / 'id00' / 'img2.png'}   17"]
    src = ListSource(_write(tmp_path / "train.txt", lines))
    assert src.labels.tolist() == [17, 5, 17] and src.num_classes == 2
    assert src.key(1) == "imgs/with space/a b.png"
    assert np.array_equal(src.decode(0), decoded(items[5][2]))
    assert np.array_equal(src.decode(1), decoded(items[0][2]))
    assert src.decode(2).shape == (1, 10, 12)


def test_csv_with_header(tmp_path, items):
    write_folder(tmp_path, items)
    src = ListSource(_write(tmp_path / "l.csv", ["path,label", "id00/img0.png,3", "id02/img3.jpg, 0"]))
    assert src.labels.tolist() == [3, 0]
    assert np.array_equal(src.decode(1), decoded(items[11][2]))


def test_parse_is_cached_and_invalidated(tmp_path, items):
    write_folder(tmp_path, items)
    path = _write(tmp_path / "l.txt", ["id00/img0.png 1", "id00/img1.jpg 2"])
    first = ListSource(path)
    again = ListSource(path)
    assert not first.from_cache and again.from_cache
    assert np.array_equal(first.labels, again.labels) and first.fingerprint() == again.fingerprint()
    _write(path, ["id00/img0.png 1", "id00/img1.jpg 3"])
    t = time.time() + 5
    os.utime(path, (t, t))
    changed = ListSource(path)
    assert not changed.from_cache and changed.labels.tolist() == [1, 3]
    assert changed.fingerprint() != first.fingerprint()


@pytest.mark.parametrize(("line", "message"), [
    ("id00/img0.png", r"l\.txt:2: expected 'path label'"),
    ("id00/img0.png 1.5", r"l\.txt:2: label '1\.5' is not an integer"),
    ("id00/img0.png x", r"l\.txt:2: label 'x' is not an integer"),
    ("id00/img0.png -1", r"l\.txt:2: label -1 is negative"),
    ("id00/nope.png 1", r"l\.txt:2: .*nope\.png: image file not found"),
])
def test_errors_name_the_line(tmp_path, items, line, message):
    write_folder(tmp_path, items)
    with pytest.raises(DataError, match=message) as err:
        ListSource(_write(tmp_path / "l.txt", ["id00/img1.jpg 0", line]))
    assert "\n" not in str(err.value)


def test_missing_and_empty_lists(tmp_path):
    with pytest.raises(DataError, match="list file not found"):
        ListSource(tmp_path / "none.txt")
    with pytest.raises(DataError, match="no 'path label' lines"):
        ListSource(_write(tmp_path / "empty.txt", ["# nothing"]))
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9.png 1\n")
    with pytest.raises(DataError, match="not UTF-8"):
        ListSource(tmp_path / "latin.txt")


def test_root_places365_lines(tmp_path, items):
    """Places365's lists write paths relative to the data root with a leading slash."""
    data = tmp_path / "data_large"
    for rel, (_, _, raw) in zip(["a/abbey/00000000.jpg", "a/abbey/00000001.jpg", "b/bar/00000000.jpg"],
                                items, strict=False):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(raw)
    lists = tmp_path / "lists"
    lists.mkdir()
    train = _write(lists / "places365_train_standard.txt",
                   ["/a/abbey/00000000.jpg 0", "/a/abbey/00000001.jpg 0", "/b/bar/00000000.jpg 1"])
    src = ListSource(train, root=data)
    assert src.labels.tolist() == [0, 0, 1] and src.key(2) == "b/bar/00000000.jpg"
    assert src.describe(0) == str(data / "a/abbey/00000000.jpg")
    assert np.array_equal(src.decode(1), decoded(items[1][2]))
    val = tmp_path / "val_large"
    val.mkdir()
    (val / "Places365_val_00000001.jpg").write_bytes(items[1][2])
    vsrc = ListSource(_write(lists / "places365_val.txt", ["Places365_val_00000001.jpg 165"]), root=val)
    assert vsrc.labels.tolist() == [165] and np.array_equal(vsrc.decode(0), decoded(items[1][2]))
    with pytest.raises(DataError, match=r"places365_train_standard\.txt:1: .*a/abbey/00000000\.jpg: image "
                                        "file not found"):
        ListSource(train)  # without root: /a/abbey/... is absolute
    with pytest.raises(DataError, match=r"nowhere: folder not found \(data\.list\.root"):
        ListSource(train, root=tmp_path / "nowhere")


def test_root_is_part_of_the_cache_key(tmp_path, items):
    """The same list under two roots: each parse checks its own root's files, sizes come from it."""
    one, two = tmp_path / "one", tmp_path / "two"
    for root, raw in ((one, items[0][2]), (two, items[1][2])):
        (root / "x").mkdir(parents=True)
        (root / "x" / "img.png").write_bytes(raw)
    path = _write(tmp_path / "l.txt", ["/x/img.png 4"])
    first = ListSource(path, root=one)
    second = ListSource(path, root=two)
    assert not first.from_cache and not second.from_cache and ListSource(path, root=one).from_cache
    assert first.fingerprint() != second.fingerprint()  # the files' sizes differ
    assert np.array_equal(second.decode(0), decoded(items[1][2]))
    (two / "x" / "img.png").unlink()
    three = tmp_path / "three"
    three.mkdir()
    with pytest.raises(DataError, match=r"l\.txt:1: .*three/x/img\.png: image file not found"):
        ListSource(path, root=three)
