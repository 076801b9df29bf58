"""Protocol-2 pickles assembled opcode by opcode as Python 2's cPickle writes them (strings as
BINSTRING / SHORT_BINSTRING, numpy arrays through ``numpy.core.multiarray._reconstruct`` with their
bytes as a str), so tests read what CIFAR's python version ships without Python 2 at hand."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

__all__ = ["py2_pickle"]


def _str(text: bytes) -> bytes:
    """A Python 2 str: SHORT_BINSTRING under 256 bytes, else BINSTRING."""
    if len(text) < 256:
        return b"U" + bytes([len(text)]) + text
    return b"T" + struct.pack("<i", len(text)) + text


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def _array(arr: np.ndarray) -> bytes:
    """``numpy.ndarray.__reduce__`` of a C-ordered array of a one-byte-or-little-endian dtype."""
    dt = arr.dtype
    order = b"|" if dt.itemsize == 1 else b"<"
    return (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _int(0) + b"\x85" + _str(b"b")
        + b"\x87R"  # TUPLE3, REDUCE: _reconstruct(ndarray, (0,), 'b')
        + b"(" + _int(1) + b"(" + b"".join(_int(d) for d in arr.shape) + b"t"  # state: version, shape
        + b"cnumpy\ndtype\n" + _str(f"{dt.kind}{dt.itemsize}".encode()) + _int(0) + _int(1) + b"\x87R"
        + b"(" + _int(3) + _str(order) + b"NNN" + _int(-1) + _int(-1) + _int(0) + b"tb"  # dtype state
        + b"\x89" + _str(np.ascontiguousarray(arr).tobytes()) + b"tb"  # NEWFALSE (not Fortran), raw data
    )


def _value(value: Any) -> bytes:
    if isinstance(value, np.ndarray):
        return _array(value)
    if isinstance(value, bytes):
        return _str(value)
    if isinstance(value, str):
        return _str(value.encode("latin1"))
    if isinstance(value, int):
        return _int(value)
    if isinstance(value, list):
        return b"](" + b"".join(_value(v) for v in value) + b"e" if value else b"]"
    raise TypeError(f"py2_pickle: unsupported value {type(value)}")


def py2_pickle(obj: dict[str, Any]) -> bytes:
    """A dict of str keys and ndarray / str / int / list values, pickled as cPickle protocol 2 does."""
    items = b"".join(_value(k) + _value(v) for k, v in obj.items())
    return b"\x80\x02}(" + items + b"u."
