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
