"""imagefolder: labels in sorted folder order, pixels as Pillow decodes them, identity from the
listing (not the location), one-line errors naming the file."""

import pickle
import shutil

import numpy as np
import pytest

from bctkit.data.sources import CorruptImageError, ImageFolderSource
from bctkit.errors import DataError

from .conftest import decoded, write_folder


def test_labels_and_pixels(tmp_path, items):
    root = write_folder(tmp_path / "ds", items, names=["bob", "alice", "carol"])
    (root / "alice" / "notes.txt").write_text("not an image")
    (root / "alice" / ".hidden.png").write_bytes(items[0][2])
    (root / ".trash").mkdir()
    src = ImageFolderSource(root)
    # folders sorted: alice (items of label 1), bob (0), carol (2); files sorted inside each
    assert src.classes == ["alice", "bob", "carol"]
    expected = sorted(((["bob", "alice", "carol"][lab], name, data) for lab, name, data in items))
    assert [src.key(i) for i in range(len(src))] == [f"{c}/{n}" for c, n, _ in expected]
    assert src.labels.tolist() == [["alice", "bob", "carol"].index(c) for c, _, _ in expected]
    assert src.labels.dtype == np.int64
    for i, (_, _, data) in enumerate(expected):
        assert np.array_equal(src.decode(i), decoded(data))
    assert src.decode(2).shape == (1, 10, 12)  # the grey PNG keeps one channel
    assert src.label_name(1) == "bob" and src.num_classes == 3


def test_nested_folders_belong_to_their_identity(tmp_path, items):
    root = write_folder(tmp_path / "ds", items)
    (root / "id01" / "more").mkdir()
    (root / "id01" / "more" / "x.png").write_bytes(items[0][2])
    src = ImageFolderSource(root)
    i = [src.key(k) for k in range(len(src))].index("id01/more/x.png")
    assert src.labels[i] == 1 and np.array_equal(src.decode(i), decoded(items[0][2]))


def test_identity_ignores_location_but_not_content(tmp_path, items):
    a = ImageFolderSource(write_folder(tmp_path / "a", items))
    moved = shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    assert ImageFolderSource(moved).fingerprint() == a.fingerprint()
    (moved / "id00" / "img0.png").write_bytes(items[1][2])  # other content, other size
    assert ImageFolderSource(moved).fingerprint() != a.fingerprint()


def test_pickles_for_workers(tmp_path, items):
    src = ImageFolderSource(write_folder(tmp_path / "ds", items))
    back = pickle.loads(pickle.dumps(src))
    assert np.array_equal(back.decode(5), src.decode(5)) and back.fingerprint() == src.fingerprint()


def test_errors_name_the_file(tmp_path, items):
    with pytest.raises(DataError, match="image folder not found"):
        ImageFolderSource(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(items[0][2])
    with pytest.raises(DataError, match="no identity folders"):
        ImageFolderSource(tmp_path / "flat")
    root = write_folder(tmp_path / "ds", items)
    (root / "zz_empty").mkdir()
    (root / "zz_empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"zz_empty: identity folder with no images"):
        ImageFolderSource(root)
    shutil.rmtree(root / "zz_empty")
    jpeg = next(data for _, name, data in items if name.endswith(".jpg"))
    (root / "id00" / "img1.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    (root / "id01" / "img0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    src = ImageFolderSource(root)
    keys = [src.key(i) for i in range(len(src))]
    with pytest.raises(CorruptImageError, match=r"id00/img1\.jpg: corrupt or truncated image") as err:
        src.read(keys.index("id00/img1.jpg"))
    assert "\n" not in str(err.value)
    with pytest.raises(CorruptImageError, match=r"id01/img0\.png: corrupt or truncated image"):
        src.read(keys.index("id01/img0.png"))
    (root / "id02" / "img0.png").unlink()
    with pytest.raises(DataError, match=r"id02/img0\.png: image file not found"):
        src.read(keys.index("id02/img0.png"))
