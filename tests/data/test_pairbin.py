"""PairBinSource / load_pair_bin: insightface verification .bin files built in the test, byte by byte
where the format matters (a Python 2 protocol-2 pickle of str images), plus files that must be refused
(a pickle that would run code, numpy flags, wrong structure, counts, undecodable images)."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bctkit.data.sources.base import CorruptImageError
from bctkit.data.sources.pairbin import PairBinImageError, PairBinSource, load_pair_bin, pair_labels
from bctkit.errors import DataError, FileFormatError


def encode(seed: int, size: tuple[int, int] = (8, 8), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8), "RGB").save(buf, fmt)
    return buf.getvalue()


def py2_string(data: bytes) -> bytes:
    """A Python 2 ``str`` as protocol 2 writes it: SHORT_BINSTRING (U, 1-byte length) below 256
    bytes, else BINSTRING (T, 4-byte little-endian length)."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def py2_pair_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """The pickle Python 2's ``pickle.dump((bins, issame), f, protocol=2)`` writes, opcode by opcode:
    PROTO 2; EMPTY_LIST, BINPUT, MARK, the strings, APPENDS; the same for the bools (NEWTRUE /
    NEWFALSE); TUPLE2, BINPUT; STOP."""
    out = b"\x80\x02" + b"]q\x00(" + b"".join(py2_string(b) for b in images) + b"e"
    out += b"]q\x01(" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e"
    return out + b"\x86q\x02."


def write(tmp_path: Path, data: bytes, name: str = "lfw.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def chw(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)


def test_python2_protocol2_file_byte_by_byte(tmp_path: Path) -> None:
    images = [encode(0, (4, 4)), encode(1), encode(2, (112, 112)), encode(3, (112, 112), "JPEG"), encode(4),
              encode(5)]
    assert len(images[0]) < 256 and len(images[2]) >= 256  # both string opcodes are exercised
    issame = [True, False, True]
    path = write(tmp_path, py2_pair_pickle(images, issame))
    src = PairBinSource(path)
    assert src.name == "lfw" and len(src) == 6 and src.pairs == 3 and src.genuine == 2
    assert src.issame.tolist() == issame
    # genuine pair p: both rows 2p; impostor pair 1: rows 2 and 3
    assert src.labels.tolist() == [0, 0, 2, 3, 4, 4]
    assert src.num_classes == 4
    for i, data in enumerate(images):
        np.testing.assert_array_equal(src.decode(i), chw(data))
    assert src.read(2).size == (112, 112)
    assert src.key(3) == "lfw#3"
    assert "image 3" in src.describe(3) and "pair 1" in src.describe(3) and "second" in src.describe(3)
    bins, flags, _ = load_pair_bin(path)
    assert bins == images and flags.dtype == bool


def test_identity_hashes_content_not_place(tmp_path: Path) -> None:
    data = pickle.dumps(([encode(0), encode(1)], [True]), protocol=4)
    a = PairBinSource(write(tmp_path, data, "a.bin"))
    b = PairBinSource(write(tmp_path, data, "b.bin"))
    assert a.identity() == b.identity() and a.fingerprint() == b.fingerprint()
    c = PairBinSource(write(tmp_path, pickle.dumps(([encode(0), encode(2)], [True]), protocol=4), "c.bin"))
    assert c.identity() != a.identity()
    d = PairBinSource(write(tmp_path, pickle.dumps(([encode(0), encode(1)], [False]), protocol=4), "d.bin"))
    assert d.fingerprint() != a.fingerprint()  # same images, other flags: other labels


@pytest.mark.parametrize("protocol", [0, 3, 4, 5])
def test_python3_pickles_lists_and_tuples(tmp_path: Path, protocol: int) -> None:
    images = (encode(0), encode(1), encode(2), encode(3))
    path = write(tmp_path, pickle.dumps((images, (False, True)), protocol=protocol))
    if protocol < 3:  # Python 3 writes bytes through the _codecs.encode global below protocol 3
        with pytest.raises(FileFormatError, match="_codecs.encode"):
            PairBinSource(path)
        return
    src = PairBinSource(path)
    assert src.labels.tolist() == [0, 1, 2, 2]


def test_pair_labels_by_hand() -> None:
    assert pair_labels(np.array([False, True, False])).tolist() == [0, 1, 2, 2, 4, 5]


class _Touch:
    """Unpickling this calls open(marker, "w"): the file appears iff the pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    witness = tmp_path / "witness"
    pickle.loads(pickle.dumps(_Touch(witness)))  # plain pickle runs it: the payload is live
    assert witness.exists()
    marker = tmp_path / "created_by_pickle"
    for payload in (([encode(0), _Touch(marker)], [True]), ([encode(0), encode(1)], [_Touch(marker)]),
                    _Touch(marker)):
        path = write(tmp_path, pickle.dumps(payload, protocol=4), "evil.bin")
        with pytest.raises(FileFormatError, match=r"evil\.bin: refused: .*global (io|builtins)\.open"):
            PairBinSource(path)
        assert not marker.exists()


def test_numpy_bool_flags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, pickle.dumps(([encode(0), encode(1)], [np.bool_(True)]), protocol=4))
    with pytest.raises(FileFormatError, match="numpy bools"):
        PairBinSource(path)
    path = write(tmp_path, pickle.dumps(([encode(0), encode(1)], np.array([True])), protocol=4))
    with pytest.raises(FileFormatError, match="refused"):
        PairBinSource(path)


def test_persistent_id_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, b"\x80\x02U\x03pidQ.")  # SHORT_BINSTRING "pid", BINPERSID, STOP
    with pytest.raises(FileFormatError, match="persistent id"):
        PairBinSource(path)


@pytest.mark.parametrize("data, match", [
    (b"", "not a readable pickle"),
    (b"hello, this is text\n", "not a readable pickle"),
    (py2_pair_pickle([encode(0), encode(1)], [True])[:-20], "not a readable pickle"),  # truncated
    (b"\x80\x02\x82\x01.", "not a readable pickle"),  # EXT1: an (unregistered) extension code
    (py2_pair_pickle([encode(0), encode(1)], [True]) + b"\x00", "1 bytes follow"),
    (pickle.dumps({"bins": [], "issame": []}), "holds a dict; expected a pair"),
    (pickle.dumps(([], [], [])), "tuple of length 3"),
    (pickle.dumps((b"xx", [True])), "images .* is a bytes; expected a list"),
    (pickle.dumps(([encode(0), encode(1)], "T")), "issame .* is a str"),
    (pickle.dumps(([encode(0), "img"], [True])), "image 1 is a str"),
    (pickle.dumps(([encode(0), encode(1)], [1])), r"issame\[0\] is 1 \(int\)"),
    (pickle.dumps(([], [])), "no pairs"),
    (pickle.dumps(([encode(0), encode(1), encode(2)], [True])), "3 images for 1 pairs"),
    (pickle.dumps(([encode(0)] * 2, [True, False])), "2 images for 2 pairs"),
])
def test_bad_files_one_line_error_naming_the_file(tmp_path: Path, data: bytes, match: str) -> None:
    path = write(tmp_path, data, "bad.bin")
    with pytest.raises(FileFormatError, match=match) as info:
        PairBinSource(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="not found"):
        PairBinSource(tmp_path / "nope.bin")


def test_undecodable_image_named_by_row_when_read(tmp_path: Path) -> None:
    path = write(tmp_path, py2_pair_pickle([encode(0), encode(1), encode(2), b"\xff\xd8\xffbroken"],
                                           [True, False]))
    src = PairBinSource(path)  # images are decoded only on demand
    src.read(2)
    with pytest.raises(PairBinImageError, match=r"lfw\.bin image 3 \(pair 1, second image\)") as info:
        src.read(3)
    assert isinstance(info.value, FileFormatError) and isinstance(info.value, CorruptImageError)
    with pytest.raises(DataError, match="out of range"):
        src.read(4)
