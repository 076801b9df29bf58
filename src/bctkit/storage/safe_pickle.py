"""Pickles that datasets ship (CIFAR's python version, the revisited Oxford/Paris ground truth), read
without running anything they name.

A pickle is a program: every class or function it names (a "global") is imported and called while
it loads. :func:`load_pickle` admits no global at all by default, so only what the pickle machine
builds by itself comes out (dicts, lists, tuples, strings, bytes, numbers, booleans, None; bytes in
protocol 2 are spelled ``_codecs.encode(text, "latin1")``, admitted for latin1 only, and empty bytes
``__builtin__.bytes()``, admitted without arguments only). With
``arrays=True`` it also admits exactly what numpy needs to rebuild a numeric array or scalar
(``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``, the scalar
constructor and protocol 5's ``_frombuffer``), and refuses object dtypes, whose elements would be
further pickles. Anything else is refused in one line naming the file and the global, before it is
imported.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from bctkit.errors import FileFormatError

__all__ = ["UnsafePickleError", "load_pickle", "loads_pickle"]

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")


class UnsafePickleError(FileFormatError):
    """A pickle names a global outside the allowed few; nothing of it was run."""


def _dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dt = np.dtype(spec, align, copy)
    if dt.hasobject:
        raise pickle.UnpicklingError(f"holds an object dtype {spec!r}")
    return dt


def _reconstruct(cls: Any, shape: Any, dtype_spec: Any) -> np.ndarray:
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"holds an array subclass {cls!r}")
    return np.ndarray.__new__(np.ndarray, shape, _dtype(dtype_spec) if not isinstance(dtype_spec, np.dtype)
                              else dtype_spec)


def _frombuffer(buf: Any, dtype: np.dtype, shape: Any, order: str = "C") -> np.ndarray:
    """numpy's protocol-5 array constructor, for numeric dtypes only."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or order not in ("C", "F"):
        raise pickle.UnpicklingError(f"holds an array of dtype {dtype!r}")
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order).copy(order=order)


def _scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"holds a scalar of dtype {dtype!r}")
    if isinstance(data, str):  # a Python 2 pickle read with encoding latin1
        data = data.encode("latin1")
    return np.frombuffer(data or b"", dtype=dtype, count=1)[0]


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it to spell bytes (latin1 only)."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError(f"names _codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as protocol-2 pickles use it to spell b"" (an empty numpy array's data)."""
    if args:
        raise pickle.UnpicklingError("names builtins.bytes with arguments")
    return b""


class _Restricted(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, arrays: bool, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self.arrays = arrays

    def find_class(self, module: str, name: str) -> Any:
        if module == "_codecs" and name == "encode":
            return _latin1_bytes
        if module in ("__builtin__", "builtins") and name == "bytes":
            return _empty_bytes
        if self.arrays:
            if module in _NUMPY_MODULES and name == "_reconstruct":
                return _reconstruct
            if module in _NUMPY_MODULES and name == "scalar":
                return _scalar
            if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
                return _frombuffer
            if module == "numpy" and name == "ndarray":
                return np.ndarray
            if module == "numpy" and name == "dtype":
                return _dtype
        raise pickle.UnpicklingError(f"names {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"holds a persistent id {pid!r}")


def loads_pickle(data: bytes, where: str, *, arrays: bool = False, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` under the rules of the module docstring; ``where`` names it in errors.
    ``encoding``: how Python 2 strings are decoded (latin1 keeps numpy's array bytes intact)."""
    allowed = ("numeric numpy arrays and plain data" if arrays
               else "plain data (dicts, lists, strings, numbers)")
    try:
        return _Restricted(io.BytesIO(data), arrays, encoding).load()
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if msg.startswith(("names ", "holds ")):
            raise UnsafePickleError(f"{where}: refused, the pickle {msg}; only {allowed} may be read "
                                    "(nothing of it was run)") from None
        raise FileFormatError(f"{where}: not a readable pickle ({msg})") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError) as exc:
        raise FileFormatError(f"{where}: truncated or corrupt pickle ({type(exc).__name__}: {exc})") from None


def load_pickle(path: str | os.PathLike[str], *, arrays: bool = False, encoding: str = "latin1") -> Any:
    """:func:`loads_pickle` of the file at ``path`` (named in errors)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise FileFormatError(f"{p}: not found") from None
    return loads_pickle(data, str(p), arrays=arrays, encoding=encoding)
