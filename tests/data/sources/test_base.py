"""The source interface: subsets are views, fingerprints come from identity and labels (never
pixels), decoding normalises modes, paths pack into two arrays."""

import io

import numpy as np
import pytest
from PIL import Image

from bctkit.data.sources import ArraySource, CorruptImageError, decode_image
from bctkit.data.sources.base import PathTable
from bctkit.errors import DataError


def _array_source(n=12, identity=None):
    images = np.arange(n * 2 * 3 * 3, dtype=np.uint8).reshape(n, 2, 3, 3)
    return ArraySource(images, np.arange(n) % 4, "toy", identity=identity)


def test_subset_is_a_view_and_nests():
    src = _array_source()
    sub = src.subset(np.array([10, 3, 5, 7]))
    assert sub.labels.tolist() == [2, 3, 1, 3]
    assert np.array_equal(sub.decode(1), src.images[3])
    inner = sub.subset(np.array([3, 0]), labels=np.array([0, 1]))
    assert inner.parent is src and inner.indices.tolist() == [7, 10]  # points at the original source
    assert np.array_equal(inner.read_many(np.array([1, 0])), src.images[[10, 7]])
    assert inner.labels.tolist() == [0, 1] and not inner.keeps_labels and sub.keeps_labels
    with pytest.raises(DataError, match="subset indices"):
        src.subset(np.array([12]))


def test_fingerprint_is_identity_and_labels_not_pixels():
    ident = {"format": "toy", "version": 1}
    a, b = _array_source(identity=ident), _array_source(identity=ident)
    b.images[:] = 0  # other pixels, same declared identity: same fingerprint (nothing hashes pixels)
    assert a.fingerprint() == b.fingerprint()
    relabelled = a.subset(None, labels=np.zeros(12, dtype=np.int64))
    assert relabelled.fingerprint() != a.subset().fingerprint()
    assert a.subset(np.arange(6)).fingerprint() != a.subset(np.arange(1, 7)).fingerprint()
    assert _array_source(identity={"format": "toy", "version": 2}).fingerprint() != a.fingerprint()
    # without a declared identity a small hand-made array is identified by its pixels
    assert _array_source().fingerprint() != ArraySource(b.images, b.labels).fingerprint()


def test_labels_are_checked():
    images = np.zeros((3, 1, 2, 2), np.uint8)
    with pytest.raises(DataError, match="labels must be integers"):
        ArraySource(images, np.array([0.0, 1.5, 2.0]))
    with pytest.raises(DataError, match="labels must be >= 0"):
        ArraySource(images, np.array([0, -1, 2]))
    with pytest.raises(DataError, match="one label per image"):
        ArraySource(images, np.array([0, 1]))
    with pytest.raises(DataError, match="uint8"):
        ArraySource(images.astype(np.float32), np.array([0, 1, 2]))


def _encode(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_decode_modes():
    rgba = Image.fromarray(np.full((4, 5, 4), 200, np.uint8), "RGBA")
    assert decode_image(_encode(rgba), "x").mode == "RGB"
    pal = Image.fromarray(np.full((4, 5, 3), 90, np.uint8), "RGB").convert("P")
    out = decode_image(_encode(pal), "x")
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(pal.convert("RGB")))
    la = Image.fromarray(np.full((4, 5, 2), 70, np.uint8), "LA")
    assert decode_image(_encode(la), "x").mode == "L"
    deep = Image.fromarray(np.full((4, 5), 4000, np.uint16))
    with pytest.raises(CorruptImageError, match="x: image mode .* not supported"):
        decode_image(_encode(deep), "x")
    with pytest.raises(CorruptImageError, match="where.png: corrupt or truncated image"):
        decode_image(b"not an image", "where.png")


def test_path_table_round_trip():
    paths = ["a/b.png", "ü/ñ é.jpg", "", "x" * 300]
    table = PathTable.from_paths(paths)
    assert [table[i] for i in range(len(table))] == paths
    assert table.blob.dtype == np.uint8 and table.offsets.tolist()[-1] == len(table.blob)
    assert PathTable.from_paths(paths).digest() == table.digest() != PathTable.from_paths(paths[:3]).digest()


def test_misnamed_file_still_decodes(tmp_path):
    png = _encode(Image.fromarray(np.full((3, 4, 3), 9, np.uint8), "RGB"))
    (tmp_path / "really_png.jpg").write_bytes(png)
    assert decode_image(tmp_path / "really_png.jpg", "x").size == (4, 3)
    gif = _encode(Image.fromarray(np.full((3, 4, 3), 9, np.uint8), "RGB"), "GIF")
    assert decode_image(gif, "no JPEG or PNG signature").size == (4, 3)
