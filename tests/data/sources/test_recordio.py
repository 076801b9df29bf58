"""The RecordIO source and writer: byte-exact framing, round trips, the label cache, one-line errors."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from bctkit.data.sources.base import CorruptImageError
from bctkit.data.sources.recordio import RecordIOConfig, RecordIOSource
from bctkit.data.sources.recordio_writer import pack_image_record, write_insightface, write_recordio
from bctkit.errors import DataError, FileFormatError

MAGIC = 0xCED7230A
MAGIC_LE = b"\x0a\x23\xd7\xce"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BCTKIT_CACHE", str(tmp_path / "cache"))


def chunk(cflag: int, data: bytes) -> bytes:
    """One RecordIO chunk assembled from the format description."""
    return struct.pack("<II", MAGIC, cflag << 29 | len(data)) + data + b"\0" * (-len(data) % 4)


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def faces() -> list[tuple[bytes, int]]:
    """3 identities x 4 RGB images of 12x10 (PNG and JPEG) plus one grey PNG of identity 3."""
    rng = np.random.default_rng(0)
    out = []
    for label in range(3):
        for k in range(4):
            img = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            out.append((encode(img, "PNG" if k % 2 else "JPEG"), label))
    out.append((encode(rng.integers(0, 256, (12, 10), dtype=np.uint8), "PNG"), 3))
    return out


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB" if img.mode != "L" else "L"))


def test_pack_image_record_layout():
    assert pack_image_record(b"IMG", 3.0, id=7, id2=9) == struct.pack("<IfQQ", 0, 3.0, 7, 9) + b"IMG"
    assert pack_image_record(b"IMG", [5, 2.5]) == (struct.pack("<IfQQ", 2, 0.0, 0, 0)
                                                   + struct.pack("<2f", 5, 2.5) + b"IMG")


@pytest.mark.parametrize(("payload", "chunks"), [
    (b"0123456789", [(0, b"0123456789")]),
    (b"abcd" + MAGIC_LE + b"efghij", [(1, b"abcd"), (3, b"efghij")]),
    (b"abcd" + MAGIC_LE + b"wxyz0123" + MAGIC_LE + b"tail", [(1, b"abcd"), (2, b"wxyz0123"), (3, b"tail")]),
    (MAGIC_LE + b"xy", [(1, b""), (3, b"xy")]),
    (b"ab" + MAGIC_LE + b"cd", [(0, b"ab" + MAGIC_LE + b"cd")]),  # unaligned: not cut
])
def test_write_recordio_framing(tmp_path, payload, chunks):
    write_recordio(tmp_path, [(4, b"first"), (9, payload)])
    first = chunk(0, b"first")
    assert (tmp_path / "train.rec").read_bytes() == first + b"".join(chunk(f, d) for f, d in chunks)
    assert (tmp_path / "train.idx").read_text() == f"4\t0\n9\t{len(first)}\n"
    assert first.endswith(b"first\0\0\0")


def test_round_trip_insightface(tmp_path):
    images = faces()
    write_insightface(tmp_path, images, image_size=(12, 10))
    src = RecordIOSource(tmp_path)
    assert src.labels.dtype == np.int64 and src.labels.tolist() == [lab for _, lab in images]
    assert src.header0 == (14, 18) and src.num_records == 18
    assert src.ranges.tolist() == [[1, 5], [5, 9], [9, 13], [13, 14]]
    assert (src.declared_classes, src.image_size) == (4, (12, 10))
    assert [src.key(i) for i in range(len(src))] == [str(i) for i in range(1, 14)]
    for i, (data, _) in enumerate(images):
        assert np.array_equal(np.asarray(src.read(i)), pixels(data))
    assert src.read(12).mode == "L" and src.decode(0).shape == (3, 12, 10)
    assert src.describe(3) == f"{tmp_path / 'train.rec'} record 4"
    ident = src.identity()
    assert ident["format"] == "recordio" and str(tmp_path) not in str(ident)
    assert RecordIOSource(tmp_path).fingerprint() == src.fingerprint()
    assert src.name == f"recordio {tmp_path.name}" and src.stored_shape() is None


def test_plain_records_in_idx_order(tmp_path):
    images = faces()[:5]
    recs = [(key, pack_image_record(data, [lab, 0.5] if key == 2 else float(lab)))
            for key, (data, lab) in zip([5, 0, 9, 2, 7], images, strict=True)]
    write_recordio(tmp_path, recs, prefix="part")
    src = RecordIOSource(tmp_path, "part")
    assert src.header0 is None and src.ranges.shape == (0, 2)
    assert src.labels.tolist() == [lab for _, lab in images]
    assert [src.key(i) for i in range(5)] == ["5", "0", "9", "2", "7"]
    assert np.array_equal(np.asarray(src.read(3)), pixels(images[3][0]))


def test_magic_inside_payload_reads_back(tmp_path):
    data = faces()[1][0]
    payload = pack_image_record(data, 2.0, id=MAGIC)  # the id field puts the magic at payload byte 8
    payload += b"\0" * (-len(payload) % 4) + MAGIC_LE + b"tail"  # bytes after the PNG end are ignored
    write_recordio(tmp_path, [(0, pack_image_record(faces()[0][0], 1.0)), (1, payload)])
    rec = (tmp_path / "train.rec").read_bytes()
    assert struct.pack("<I", 1 << 29 | 8) in rec and rec.count(MAGIC_LE) == 4
    src = RecordIOSource(tmp_path)
    assert src.labels.tolist() == [1, 2]
    assert src.payload(1) == payload
    assert np.array_equal(np.asarray(src.read(1)), pixels(data))


def test_idx_with_blank_lines_and_crlf(tmp_path):
    write_insightface(tmp_path, faces())
    idx = tmp_path / "train.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\r\n".join(lines[:3]) + "\r\n\n  \n" + "\n".join(lines[3:]))
    src = RecordIOSource(tmp_path)
    assert src.labels.tolist() == [lab for _, lab in faces()]


def test_label_cache(tmp_path):
    write_insightface(tmp_path / "d", faces())
    first = RecordIOSource(tmp_path / "d")
    second = RecordIOSource(tmp_path / "d")
    assert not first.from_cache and second.from_cache
    for name in ("labels", "record_ids", "offsets", "ranges"):
        assert np.array_equal(getattr(first, name), getattr(second, name))
    assert second.header0 == first.header0
    assert list((tmp_path / "cache" / "sources").glob("recordio-*.npz"))
    idx = tmp_path / "d" / "train.idx"
    st = idx.stat()
    os.utime(idx, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not RecordIOSource(tmp_path / "d").from_cache


def test_pickles_and_reads(tmp_path):
    images = faces()
    write_insightface(tmp_path, images)
    src = RecordIOSource(tmp_path)
    src.read(0)
    clone = pickle.loads(pickle.dumps(src))
    assert np.array_equal(np.asarray(clone.read(5)), pixels(images[5][0]))
    assert np.array_equal(clone.labels, src.labels)
    src._pid = -1  # as after a fork: the next read opens a descriptor of its own
    assert np.array_equal(np.asarray(src.read(2)), pixels(images[2][0]))
    src.close()


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_truncated_rec(tmp_path):
    write_insightface(tmp_path, faces())
    rec = tmp_path / "train.rec"
    last = int((tmp_path / "train.idx").read_text().split()[-1])
    data = rec.read_bytes()
    rec.write_bytes(data[: last + 4 + (len(data) - last) // 2])
    with pytest.raises(FileFormatError) as exc:
        RecordIOSource(tmp_path)
    assert "record 17" in one_line(exc) and "truncated" in str(exc.value)
    write_recordio(tmp_path, [(k, pack_image_record(d, float(lab))) for k, (d, lab) in enumerate(faces())])
    last = int((tmp_path / "train.idx").read_text().split()[-1])
    data = rec.read_bytes()
    rec.write_bytes(data[: (last + len(data)) // 2])
    with pytest.raises(FileFormatError) as exc:
        RecordIOSource(tmp_path)
    assert f"{rec} record 12" in one_line(exc) and "truncated" in str(exc.value)


def test_idx_offset_past_end(tmp_path):
    write_insightface(tmp_path, faces())
    size = (tmp_path / "train.rec").stat().st_size
    with open(tmp_path / "train.idx", "a") as fh:
        fh.write(f"99\t{size - 4}\n")
    with pytest.raises(FileFormatError) as exc:
        RecordIOSource(tmp_path)
    assert "train.idx:19" in one_line(exc) and "record 99" in str(exc.value)


@pytest.mark.parametrize("bad", ["3\tabc", "3 7 9", "-3\t7", "12"])
def test_malformed_idx_line(tmp_path, bad):
    write_insightface(tmp_path, faces())
    idx = tmp_path / "train.idx"
    lines = idx.read_text().splitlines()
    lines[2] = bad
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(FileFormatError) as exc:
        RecordIOSource(tmp_path)
    assert f"{idx}:3:" in one_line(exc)


def test_duplicate_key(tmp_path):
    write_recordio(tmp_path, [(1, pack_image_record(b"x", 0.0)), (2, pack_image_record(b"y", 0.0))])
    idx = tmp_path / "train.idx"
    idx.write_text(idx.read_text().replace("2\t", "1\t"))
    with pytest.raises(FileFormatError, match=r"train\.idx:2: record 1 is listed again"):
        RecordIOSource(tmp_path)


def test_bad_magic(tmp_path):
    write_insightface(tmp_path, faces())
    offsets = [int(x) for x in (tmp_path / "train.idx").read_text().split()[1::2]]
    rec = tmp_path / "train.rec"
    data = bytearray(rec.read_bytes())
    data[offsets[6]: offsets[6] + 4] = b"JUNK"
    rec.write_bytes(bytes(data))
    with pytest.raises(FileFormatError) as exc:
        RecordIOSource(tmp_path)
    assert "record 6" in one_line(exc) and "bad magic" in str(exc.value)


@pytest.mark.parametrize("label", [-1.0, 2.5, float("nan")])
def test_bad_label(tmp_path, label):
    write_recordio(tmp_path, [(0, pack_image_record(b"x", 1.0)), (1, pack_image_record(b"y", label))])
    with pytest.raises(DataError) as exc:
        RecordIOSource(tmp_path)
    assert f"{tmp_path / 'train.rec'} record 1" in one_line(exc) and "label" in str(exc.value)


def test_corrupt_image(tmp_path):
    write_recordio(tmp_path, [(0, pack_image_record(b"not an image at all", 4.0))])
    src = RecordIOSource(tmp_path)
    assert src.labels.tolist() == [4]
    with pytest.raises(CorruptImageError) as exc:
        src.read(0)
    assert f"{tmp_path / 'train.rec'} record 0" in one_line(exc)


@pytest.mark.parametrize("ranges", [[(1, 3), (4, 5)], [(1, 3), (3, 4)], [(1, 3), (3, 2)]])
def test_identity_ranges_must_partition(tmp_path, ranges):
    recs = [(0, pack_image_record(b"", [5, 7]))]
    recs += [(k, pack_image_record(b"img", 0.0)) for k in range(1, 5)]
    recs += [(5 + j, pack_image_record(b"", list(r))) for j, r in enumerate(ranges)]
    write_recordio(tmp_path, recs)
    with pytest.raises(FileFormatError) as exc:
        RecordIOSource(tmp_path)
    assert "record 6" in one_line(exc) and "partition" in str(exc.value)


def test_missing_files_and_bad_property(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        RecordIOSource(tmp_path / "nope")
    write_insightface(tmp_path, faces(), image_size=(12, 10))
    (tmp_path / "property").write_text("4,12\n")
    with pytest.raises(FileFormatError) as exc:
        RecordIOSource(tmp_path)
    assert str(tmp_path / "property") in one_line(exc)
    (tmp_path / "train.idx").unlink()
    with pytest.raises(DataError, match=r"train\.idx: file not found"):
        RecordIOSource(tmp_path)


def test_writer_and_config_checks(tmp_path):
    with pytest.raises(DataError, match="sorted by label"):
        write_insightface(tmp_path, [(b"a", 1), (b"b", 0)])
    with pytest.raises(DataError, match="key 1 is repeated"):
        write_recordio(tmp_path, [(1, b"a"), (1, b"b")])
    assert not (tmp_path / "train.rec").exists()
    assert RecordIOConfig(path="/data/ms1m").prefix == "train"
    with pytest.raises(ValueError):
        RecordIOConfig(path="x", extra=1)


def test_scan_blocks_and_label_forms(tmp_path, monkeypatch):
    """Header labels, label arrays, split records and a last record shorter than the gathered
    window, over several scan blocks: the vectorized and the per-record paths agree."""
    import bctkit.data.sources.recordio as recordio

    monkeypatch.setattr(recordio, "_BLOCK", 7)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 1000, 60)
    forms = [lambda v: float(v), lambda v: [v], lambda v: [v, 9.0, 8.0]]
    recs = [(k, pack_image_record(b"pix" * (k % 5), forms[k % 3](lab), id=MAGIC if k % 11 == 0 else k))
            for k, lab in enumerate(labels)]
    recs.append((60, pack_image_record(b"", 7.0)))  # 32 bytes on disk: shorter than the gathered window
    write_recordio(tmp_path, recs)
    assert RecordIOSource(tmp_path).labels.tolist() == [*labels.tolist(), 7]


def test_tiny_file(tmp_path):
    write_recordio(tmp_path, [(3, pack_image_record(b"ab", 5.0))])
    assert (tmp_path / "train.rec").stat().st_size == 36
    assert RecordIOSource(tmp_path).labels.tolist() == [5]


def test_header_announcing_unlisted_records(tmp_path):
    write_recordio(tmp_path, [(0, pack_image_record(b"", [4, 5])), (1, pack_image_record(b"x", 0.0))])
    with pytest.raises(FileFormatError) as exc:
        RecordIOSource(tmp_path)
    assert "train.idx: image record 2 is not listed" in one_line(exc)
    write_recordio(tmp_path, [(0, pack_image_record(b"", [4])), (1, pack_image_record(b"x", 0.0))])
    with pytest.raises(FileFormatError, match="record 0 .*insightface header"):
        RecordIOSource(tmp_path)


def test_writer_rejects_bad_input_before_writing(tmp_path):
    with pytest.raises(DataError, match="num_classes 2 <= the largest label 3"):
        write_insightface(tmp_path, [(b"a", 0), (b"b", 3)], num_classes=2, image_size=(4, 4))
    with pytest.raises(DataError, match="key -1"):
        write_recordio(tmp_path, [(-1, b"a")])
    assert not list(tmp_path.iterdir())
