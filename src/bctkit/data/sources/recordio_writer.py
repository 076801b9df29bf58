"""Writing insightface's RecordIO layout (see :mod:`bctkit.data.sources.recordio` for the format):
pack your own images into ``train.rec`` / ``train.idx`` for arcface_torch-style training, or build
test data. Everything is written atomically."""

from __future__ import annotations

import numbers
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from bctkit.data.sources.recordio import CHUNK, IR_HEADER, LEN_MASK, MAGIC, MAGIC_BYTES
from bctkit.errors import DataError
from bctkit.storage import atomic_path, write_text

__all__ = ["frame_record", "pack_image_record", "write_insightface", "write_recordio"]


def frame_record(payload: bytes) -> bytes:
    """``payload`` as RecordIO chunks: cut at every 4-byte-aligned copy of the magic number (dropped;
    the reader puts it back), each part headed by magic + lrec, the last padded with zeros to 4 bytes."""
    n = len(payload)
    if n > LEN_MASK:
        raise DataError(f"a RecordIO record holds < 2**29 bytes, got {n}")
    cuts: list[int] = []
    if MAGIC_BYTES in payload:
        words = np.frombuffer(payload, dtype="<u4", count=n // 4)
        cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
    out: list[bytes] = []
    start = 0
    for k, cut in enumerate(cuts):
        out += [CHUNK.pack(MAGIC, (1 if k == 0 else 2) << 29 | (cut - start)), payload[start:cut]]
        start = cut + 4
    out += [CHUNK.pack(MAGIC, (3 if cuts else 0) << 29 | (n - start)), payload[start:], bytes(-n % 4)]
    return b"".join(out)


def pack_image_record(image_bytes: bytes, label: float | Sequence[float], id: int = 0, id2: int = 0) -> bytes:
    """An mxnet image record payload: a float label gives flag 0 and the label in the header, a
    sequence of floats flag = its length and the float32 values after the header."""
    if isinstance(label, numbers.Real):
        return IR_HEADER.pack(0, float(label), id, id2) + image_bytes
    values = np.asarray(label, dtype="<f4").ravel()
    if not len(values):
        raise DataError("pack_image_record: an empty label sequence")
    return IR_HEADER.pack(len(values), 0.0, id, id2) + values.tobytes() + image_bytes


def write_recordio(folder: str | os.PathLike[str], records: Iterable[tuple[int, bytes]],
                   prefix: str = "train") -> int:
    """Write ``<prefix>.rec`` and ``<prefix>.idx`` in ``folder`` from (key, payload) pairs (atomically,
    replacing existing files); returns the number of records."""
    folder = Path(folder)
    keys = array("q")  # 8 bytes a key, checked once at the end (a set would cost ~70)
    with atomic_path(folder / f"{prefix}.rec") as rec_tmp, atomic_path(folder / f"{prefix}.idx") as idx_tmp, \
            open(rec_tmp, "wb") as rec, open(idx_tmp, "w", encoding="ascii") as idx:
        pos = 0
        for key, payload in records:
            keys.append(int(key))
            framed = frame_record(payload)
            rec.write(framed)
            idx.write(f"{int(key)}\t{pos}\n")
            pos += len(framed)
        ordered = np.sort(np.frombuffer(keys, dtype=np.int64))
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if len(ordered) and (ordered[0] < 0 or len(repeated)):
            raise DataError(f"write_recordio: record key {repeated[0] if len(repeated) else ordered[0]} "
                            "is repeated or negative; keys must be distinct non-negative integers")
    return len(keys)


def write_insightface(folder: str | os.PathLike[str], images: Sequence[tuple[bytes, int]],
                      num_classes: int | None = None, image_size: tuple[int, int] | None = None,
                      prefix: str = "train") -> None:
    """Write (encoded image, label) pairs, sorted by label, in insightface's layout: header record 0,
    images 1..N, one identity record per label with its [start, end) image ids, and a ``property``
    file ``num_classes,height,width`` when ``image_size`` (height, width) is given (num_classes
    defaults to the largest label + 1)."""
    labels = np.asarray([lab for _, lab in images])
    if not len(labels) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError("write_insightface: needs at least one image and non-negative integer labels")
    if np.any(np.diff(labels) < 0):
        raise DataError("write_insightface: images must be sorted by label")
    starts = np.concatenate(([0], np.flatnonzero(np.diff(labels)) + 1)) + 1
    ends = np.append(starts[1:], len(labels) + 1)
    a = len(labels) + 1
    b = a + len(starts)
    if b > 1 << 24 or labels.max() >= 1 << 24:
        raise DataError("write_insightface: record ids and labels must stay below 2**24 (float32 labels)")
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if classes <= labels.max():
        raise DataError(f"write_insightface: num_classes {classes} <= the largest label {labels.max()}")

    def records() -> Iterator[tuple[int, bytes]]:
        yield 0, pack_image_record(b"", [a, b])
        for k, (img, lab) in enumerate(images, 1):
            yield k, pack_image_record(img, float(lab), id=k)
        for k, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True), a):
            yield k, pack_image_record(b"", [s, e], id=k)

    write_recordio(folder, records(), prefix)
    if image_size is not None:
        write_text(Path(folder) / "property", f"{classes},{image_size[0]},{image_size[1]}\n")
