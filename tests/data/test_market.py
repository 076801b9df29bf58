"""Re-id folders (Market-1501 / DukeMTMC names) and the concatenating source."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bctkit.data.sources.array import ArraySource
from bctkit.data.sources.market import ConcatSource, ReIDFolderSource, parse_reid_name, reid_folders
from bctkit.errors import DataError


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 3, 3), value, np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def make_root(root: Path, query: list[str], gallery: list[str]) -> Path:
    for sub, names in (("query", query), ("bounding_box_test", gallery)):
        (root / sub).mkdir(parents=True)
        for k, name in enumerate(names):
            (root / sub / name).write_bytes(png(k))
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")
    return root


@pytest.mark.parametrize("name,expected", [
    ("0002_c1s1_000451_03.jpg", (2, 1)),
    ("-1_c3s2_001234_01.jpg", (-1, 3)),
    ("0000_c6s4_002202_02.jpg", (0, 6)),
    ("0005_c2_f0046985.jpg", (5, 2)),
    ("1501_c12_f1.png", (1501, 12)),
])
def test_parse_names(name, expected):
    assert parse_reid_name(name) == expected


@pytest.mark.parametrize("name", ["c1_0002.jpg", "0002-c1s1.jpg", "abcd_c1s1_000451_03.jpg", "0002_cx.jpg"])
def test_unparsable_name_is_one_line_error_naming_the_file(name):
    with pytest.raises(DataError, match=name) as err:
        parse_reid_name(f"/data/query/{name}")
    assert "\n" not in str(err.value) and "<person>_c<camera>" in str(err.value)


def test_folder_source_reads_ids_cameras_and_images(tmp_path):
    root = make_root(tmp_path, ["0002_c1s1_000451_03.png"],
                     ["0002_c2s1_000100_01.png", "-1_c1s1_000001_01.png", "0000_c3s1_000002_01.png"])
    query, gallery = reid_folders(root)
    assert len(gallery) == 3  # Thumbs.db skipped
    # sorted file names: -1_..., 0000_..., 0002_...
    assert gallery.pids.tolist() == [-1, 0, 2] and gallery.cams.tolist() == [1, 3, 2]
    assert [gallery.label_name(int(v)) for v in gallery.labels] == ["-1", "0000", "0002"]
    assert gallery.key(2) == "bounding_box_test/0002_c2s1_000100_01.png"
    assert query.key(0) == "query/0002_c1s1_000451_03.png"
    assert gallery.decode(1).shape == (3, 4, 3) and int(gallery.decode(1)[0, 0, 0]) == 2  # written third


def test_bad_folder_names_a_file(tmp_path):
    root = make_root(tmp_path, ["0002_c1s1_000451_03.png"], ["0002_c2s1_000100_01.png", "img7.png"])
    with pytest.raises(DataError, match="img7.png"):
        reid_folders(root)
    with pytest.raises(DataError, match="re-id root not found"):
        reid_folders(tmp_path / "missing")
    with pytest.raises(DataError, match="gt_bbox"):
        ReIDFolderSource(root, "gt_bbox")
    with pytest.raises(DataError, match="expected one of query, gt_bbox"):
        reid_folders(root, "train")


class Named(ArraySource):
    def __init__(self, labels, names, fill):
        super().__init__(np.full((len(labels), 1, 2, 2), fill, np.uint8), labels, name=f"named{fill}")
        self.names = names

    def label_name(self, label: int) -> str:
        return self.names[label]


def test_concat_matches_identities_by_name_not_by_label():
    a = Named([0, 1, 1], ["bob", "ann"], 10)
    b = Named([0, 0, 1, 2], ["ann", "cy", "bob"], 20)
    cat = ConcatSource([a, b])
    names = [cat.label_name(int(v)) for v in cat.labels]
    assert names == ["bob", "ann", "ann", "ann", "ann", "cy", "bob"]
    assert cat.labels[0] == cat.labels[6] and cat.labels[1] == cat.labels[3]
    assert len(cat) == 7 and cat.key(3) == "0" and cat.describe(4) == b.describe(1)
    assert int(cat.decode(2)[0, 0, 0]) == 10 and int(cat.decode(3)[0, 0, 0]) == 20
    assert cat.stored_shape() == (1, 2, 2)
    with pytest.raises(IndexError):
        cat.read(7)
    assert cat.fingerprint() != ConcatSource([b, a]).fingerprint()
