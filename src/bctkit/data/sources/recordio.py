"""``recordio``: insightface's MXNet RecordIO training sets (``train.rec`` + ``train.idx``, optional
``property``), read with numpy and Pillow alone (no mxnet).

- ``<prefix>.idx``: one ``key<TAB>offset`` line per record (offset: the record's first byte in .rec).
- ``<prefix>.rec``: a record is one or more chunks ``uint32 magic 0xced7230a, uint32 lrec`` (3-bit
  continuation flag, 29-bit length), the data, zero padding to 4 bytes. The writer cuts a payload at
  every 4-byte-aligned copy of the magic number and drops it (flags 1 first, 2 middle, 3 last); the
  reader joins the parts with the magic number (dmlc-core recordio).
- A payload is the header ``<IfQQ`` (flag, label, id, id2), ``flag`` float32 labels when flag > 0,
  then the encoded image (mxnet ``recordio.pack``).
- insightface layout: when record 0's header has flag > 0, its labels (a, b) say that records
  1 .. a-1 are images and a .. b-1 identities with label (start, end): their image ids. Otherwise every
  record in .idx is an image, in .idx order. An image's label is its own header label (or the first
  value of its label array), as arcface_torch trains on.
- ``property``: ``num_classes,height,width``.

Labels come from the record headers without decoding an image (vectorized over a memmap of the .rec
file) and are cached by the index files' signatures; images are read with ``os.pread``.
"""

from __future__ import annotations

import hashlib
import os
import struct
from contextlib import suppress
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from pydantic import BaseModel, ConfigDict

from bctkit.data.sources.base import CorruptImageError, DataSource, decode_image, file_signature
from bctkit.data.sources.scan_cache import cached_scan
from bctkit.errors import DataError, FileFormatError

__all__ = ["CHUNK", "IR_HEADER", "MAGIC", "RecordIOConfig", "RecordIOSource", "parse_idx"]

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LEN_MASK = (1 << 29) - 1
IR_HEADER = struct.Struct("<IfQQ")
IR_SIZE = IR_HEADER.size  # 24
CHUNK = struct.Struct("<II")
_WORDS = 10  # uint32 words gathered per record: chunk header, IR header, two label floats
_BLOCK = 1 << 18  # records per vectorized gather
_INT64_MAX = np.iinfo(np.int64).max
_Index = tuple[np.ndarray, np.ndarray, np.ndarray]  # .idx keys, offsets, line numbers
SCAN_VERSION = 1


class RecordIOConfig(BaseModel):
    """``data.recordio`` / ``data.eval.recordio``: the folder with ``<prefix>.rec`` / ``<prefix>.idx``."""

    model_config = ConfigDict(extra="forbid")

    path: str
    prefix: str = "train"


def parse_idx(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, offsets, 1-based line numbers) of an .idx file, int64; a FileFormatError naming
    ``file:line`` for a line that is not two non-negative integers. Blank lines are skipped."""
    data = path.read_bytes()
    fast = _parse_idx_fast(data)
    if fast is not None:
        return *fast, np.arange(1, len(fast[0]) + 1, dtype=np.int64)
    rows: list[tuple[int, int, int]] = []
    for lineno, line in enumerate(data.split(b"\n"), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not all(p.isdigit() and len(p) <= 18 for p in parts):
            text = line.strip()[:60].decode("utf-8", "replace")
            raise FileFormatError(f"{path}:{lineno}: expected 'key<TAB>offset' (two non-negative "
                                  f"integers), got {text!r}")
        rows.append((int(parts[0]), int(parts[1]), lineno))
    keys, offsets, lines = np.asarray(rows, dtype=np.int64).reshape(-1, 3).T.copy()
    return keys, offsets, lines


def _parse_idx_fast(data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """The usual .idx (digits only, exactly two numbers on every line, no blank lines) parsed with
    numpy; None for anything else, which the line-by-line parser then reads or reports."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if not len(buf):
        return None
    space = buf <= 32
    if not np.all(space | ((buf - np.uint8(48)) < 10)):
        return None
    starts = np.flatnonzero(space[:-1] & ~space[1:]) + 1
    if not space[0]:
        starts = np.concatenate(([0], starts))
    ends = np.flatnonzero(buf == 10)
    if not data.endswith(b"\n"):
        ends = np.append(ends, len(buf))
    prev = np.concatenate(([-1], ends[:-1]))
    if len(starts) != 2 * len(ends) or not (np.all(starts[0::2] > prev) and np.all(starts[1::2] < ends)):
        return None
    try:
        values = np.fromstring(data, dtype=np.int64, sep=" ")
    except ValueError:
        return None
    if len(values) != len(starts) or values.max() >= _INT64_MAX:  # numpy saturates on overflow
        return None
    return values[0::2], values[1::2]


def _read_property(path: Path) -> tuple[int | None, tuple[int, int] | None]:
    """(num_classes, (height, width)) from an insightface ``property`` file, (None, None) without one."""
    if not path.is_file():
        return None, None
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise FileFormatError(f"{path}: expected one line 'num_classes,height,width' (positive "
                              f"integers), got {text[:60]!r}")
    return int(parts[0]), (int(parts[1]), int(parts[2]))


def _integral(values: np.ndarray) -> np.ndarray:
    """Mask of the values that are finite non-negative integers representable as int64."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (values >= 0) & (values < 2.0**63) & (values == np.floor(values))


def _bad_magic(where: str, magic: int, pos: int) -> FileFormatError:
    return FileFormatError(f"{where}: bad magic number 0x{magic:08x} at byte {pos} (expected "
                           f"0x{MAGIC:08x}): not a RecordIO record, or a wrong .idx offset")


class RecordIOSource(DataSource):
    """See the module docstring. ``header0`` is (a, b) in the insightface layout else None,
    ``ranges`` the identity records' [start, end) image ids (int64 [K, 2]), ``record_ids`` /
    ``offsets`` the images' record ids and byte offsets, ``declared_classes`` / ``image_size`` the
    property file's values (None without one), ``from_cache`` whether the labels came from the cache."""

    _fd: int | None = None
    _pid: int | None = None

    def __init__(self, path: str | os.PathLike[str], prefix: str = "train", name: str | None = None) -> None:
        self.folder = Path(path).expanduser()
        self.prefix = prefix
        if not self.folder.is_dir():
            raise DataError(f"{self.folder}: RecordIO folder not found (data.recordio.path)")
        self.rec_path = self.folder / f"{prefix}.rec"
        self.idx_path = self.folder / f"{prefix}.idx"
        for p in (self.rec_path, self.idx_path):
            if not p.is_file():
                raise DataError(f"{p}: file not found (a RecordIO set is {prefix}.rec + {prefix}.idx)")
        self.rec_size = self.rec_path.stat().st_size
        self.declared_classes, self.image_size = _read_property(self.folder / "property")
        arrays, self.from_cache = cached_scan("recordio", [self.idx_path, self.rec_path],
                                              {"version": SCAN_VERSION, "prefix": prefix}, self._scan)
        self.record_ids, self.offsets, self._labels, self.ranges = (
            arrays[k] for k in ("ids", "offsets", "labels", "ranges"))
        self.header0 = tuple(int(v) for v in arrays["header0"]) or None
        self.num_records = int(arrays["num_records"])
        self.name = name or f"recordio {self.folder.resolve().name}"

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def payload(self, i: int) -> bytes:
        """Image ``i``'s whole record payload (header, label array, encoded image)."""
        return self._read_payload(int(self.offsets[i]), self.describe(i))

    def read(self, i: int) -> Image.Image:
        where = self.describe(i)
        data = self._read_payload(int(self.offsets[i]), where)
        flag = int.from_bytes(data[:4], "little")
        start = IR_SIZE + 4 * flag
        if len(data) < start:
            raise CorruptImageError(f"{where}: record of {len(data)} bytes is shorter than its header "
                                    f"({start} bytes)")
        return decode_image(data[start:], where=where)

    @cached_property
    def _idx_sha256(self) -> str:
        with open(self.idx_path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()

    def identity(self) -> dict[str, Any]:
        return {"format": "recordio", "prefix": self.prefix, "idx_sha256": self._idx_sha256,
                "rec_size": self.rec_size, "rec_edges": file_signature(self.rec_path)["edges"]}

    def describe(self, i: int) -> str:
        return f"{self.rec_path} record {int(self.record_ids[i])}"

    def key(self, i: int) -> str:
        return str(int(self.record_ids[i]))

    def close(self) -> None:
        """Close this process's .rec descriptor (reopened on the next read)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __del__(self) -> None:
        with suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_pid")}

    def _file(self) -> int:
        """The .rec descriptor of this process, opened on first use and again after a fork."""
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.rec_path, os.O_RDONLY), os.getpid()
        return self._fd

    def _read_payload(self, offset: int, where: str) -> bytes:
        """The payload of the record at byte ``offset``, its chunks joined by the magic number."""
        fd = self._file()
        parts: list[bytes] = []
        pos = offset
        while True:
            head = os.pread(fd, 8, pos)
            if len(head) < 8:
                raise FileFormatError(f"{where}: truncated: chunk header at byte {pos} runs past the end "
                                      f"of the file ({self.rec_size} bytes)")
            magic, lrec = CHUNK.unpack(head)
            if magic != MAGIC:
                raise _bad_magic(where, magic, pos)
            cflag, length = lrec >> 29, lrec & LEN_MASK
            if cflag not in ((2, 3) if parts else (0, 1)):
                raise FileFormatError(f"{where}: chunk at byte {pos} has continuation flag {cflag}, "
                                      f"expected {'2 or 3' if parts else '0 or 1 (a record start)'}")
            padded = (length + 3) & ~3
            data = os.pread(fd, padded, pos + 8)
            if len(data) < padded:
                raise FileFormatError(f"{where}: truncated: the record's {padded}-byte chunk at byte {pos} "
                                      f"runs past the end of the file ({self.rec_size} bytes)")
            parts.append(data if padded == length else data[:length])
            pos += 8 + padded
            if cflag in (0, 3):
                return MAGIC_BYTES.join(parts)

    def _where(self, key: int, line: int) -> str:
        return f"{self.rec_path} record {key} ({self.idx_path.name}:{line})"

    def _scan(self) -> dict[str, np.ndarray]:
        """Parse and check .idx, find the layout, read every image's label from its header."""
        keys, offsets, lines = idx = parse_idx(self.idx_path)
        if not len(keys):
            raise FileFormatError(f"{self.idx_path}: no records")
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if len(dup):
            first, again = sorted(order[dup[0]:dup[0] + 2])
            raise FileFormatError(f"{self.idx_path}:{lines[again]}: record {keys[again]} is listed "
                                  f"again (first on line {lines[first]})")
        past = np.flatnonzero(offsets + 8 > self.rec_size)
        if len(past):
            j = past[0]
            raise FileFormatError(f"{self.idx_path}:{lines[j]}: record {keys[j]} offset {offsets[j]} is "
                                  f"past the end of {self.rec_path} ({self.rec_size} bytes)")

        def positions(ids: np.ndarray, what: str) -> np.ndarray:
            at = np.minimum(np.searchsorted(sorted_keys, ids), len(sorted_keys) - 1)
            missing = np.flatnonzero(sorted_keys[at] != ids)
            if len(missing):
                raise FileFormatError(f"{self.idx_path}: {what} record {ids[missing[0]]} is not listed "
                                      f"({len(missing)} missing); record 0 announces the insightface layout")
            return order[at]

        mm = np.memmap(self.rec_path, dtype="<u4", mode="r", shape=(self.rec_size // 4,))
        images, ranges, header0 = np.arange(len(keys)), np.zeros((0, 2), np.int64), ()
        if sorted_keys[0] == 0:
            flag, a, b = (v[0] for v in self._scan_headers(mm, idx, order[:1]))
            if flag > 0:
                if not (np.all(_integral(np.asarray([a, b]))) and 1 < a <= b):
                    raise FileFormatError(f"{self._where(0, lines[order[0]])}: the insightface header's "
                                          f"labels (flag {flag}) must be integers 1 < a <= b, got ({a}, {b})")
                header0 = a, b = int(a), int(b)
                images = positions(np.arange(1, a), "image")
                ranges = self._identity_ranges(mm, idx, positions(np.arange(a, b), "identity"), a)
        labels = self._scan_headers(mm, idx, images)[1]
        bad = np.flatnonzero(~_integral(labels))
        if len(bad):
            j = images[bad[0]]
            raise DataError(f"{self._where(keys[j], lines[j])}: label {labels[bad[0]]!r} is not a "
                            "non-negative integer")
        return {"ids": keys[images], "offsets": offsets[images], "labels": labels.astype(np.int64),
                "ranges": ranges, "header0": np.asarray(header0, dtype=np.int64),
                "num_records": np.asarray(len(keys), dtype=np.int64)}

    def _identity_ranges(self, mm: np.ndarray, idx: _Index, pos: np.ndarray, a: int) -> np.ndarray:
        """The identity records' [start, end) image ids, checked to partition [1, a) in order."""
        keys, _, lines = idx
        _, start, end = self._scan_headers(mm, idx, pos)
        if not len(pos):
            return np.zeros((0, 2), np.int64)
        bad = np.flatnonzero(~_integral(start) | ~_integral(end))
        if len(bad):
            j = pos[bad[0]]
            raise FileFormatError(f"{self._where(keys[j], lines[j])}: identity record needs an integer "
                                  f"(start, end) label pair, got ({start[bad[0]]}, {end[bad[0]]})")
        ranges = np.stack([start, end], axis=1).astype(np.int64)
        expected = np.concatenate(([1], ranges[:-1, 1]))
        bad = np.flatnonzero((ranges[:, 0] != expected) | (ranges[:, 1] < ranges[:, 0]))
        if len(bad) or ranges[-1, 1] != a:
            k = bad[0] if len(bad) else len(ranges) - 1
            j = pos[k]
            raise FileFormatError(f"{self._where(keys[j], lines[j])}: identity range [{ranges[k, 0]}, "
                                  f"{ranges[k, 1]}) breaks the partition of the image ids [1, {a}) "
                                  f"(expected a range starting at {expected[k]}, the last ending at {a})")
        return ranges

    def _scan_headers(self, mm: np.ndarray, idx: _Index, pos: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flag, first label, second label) of the records at .idx positions ``pos``: the header label
        when flag is 0, else the first two values of the label array (NaN where absent). Records whose
        first chunk holds header and labels are gathered in blocks from the memmap; others are read
        whole with pread."""
        keys, offsets, lines = (a[pos] for a in idx)
        n = len(offsets)
        flags = np.zeros(n, np.int64)
        first, second = np.full(n, np.nan), np.full(n, np.nan)
        done = np.zeros(n, bool)
        windows = sliding_window_view(np.asarray(mm), _WORDS) if len(mm) >= _WORDS else None
        for s in range(0, n if windows is not None else 0, _BLOCK):
            off = offsets[s:s + _BLOCK]
            rows = np.flatnonzero((off % 4 == 0) & (off + 4 * _WORDS <= self.rec_size))
            w = windows[off[rows] // 4]  # [rows, _WORDS]: each record's first words
            bad = np.flatnonzero(w[:, 0] != MAGIC)
            if len(bad):
                j = s + rows[bad[0]]
                raise _bad_magic(self._where(keys[j], lines[j]), int(w[bad[0], 0]), int(offsets[j]))
            length = (w[:, 1] & LEN_MASK).astype(np.int64)
            flag = w[:, 2].astype(np.int64)
            ok = ((w[:, 1] >> 29) == 0) & (length >= IR_SIZE + 4 * flag)
            ok &= off[rows] + 8 + ((length + 3) & ~3) <= self.rec_size
            if not ok.all():
                rows, w, flag = rows[ok], w[ok], flag[ok]
            w = w.view(np.float32)
            flags[s + rows] = flag
            first[s + rows] = np.where(flag == 0, w[:, 3], w[:, 8])
            second[s + rows] = np.where(flag >= 2, w[:, 9], np.nan)
            done[s + rows] = True
        for j in np.flatnonzero(~done):
            where = self._where(keys[j], lines[j])
            data = self._read_payload(int(offsets[j]), where)
            flag, label = IR_HEADER.unpack_from(data)[:2] if len(data) >= IR_SIZE else (0, 0.0)
            if len(data) < IR_SIZE + 4 * flag:
                raise FileFormatError(f"{where}: record of {len(data)} bytes is shorter than its header "
                                      f"({IR_SIZE} bytes + {flag} labels)")
            values = struct.unpack_from(f"<{min(flag, 2)}f", data, IR_SIZE)
            flags[j], first[j] = flag, values[0] if flag else label
            second[j] = values[1] if flag >= 2 else np.nan
        return flags, first, second
