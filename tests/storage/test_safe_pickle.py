"""safe_pickle: protocol 2's spelling of empty bytes (``bytes()``, e.g. an empty numpy array) is read;
``bytes`` with arguments, like any other global, is refused in one line."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from bctkit.storage.safe_pickle import UnsafePickleError, loads_pickle


def test_empty_bytes_and_empty_arrays_of_protocol_2():
    data = pickle.dumps({"a": np.array([], np.int64), "b": np.array([3, 4]), "c": b""}, protocol=2)
    got = loads_pickle(data, "x", arrays=True)
    assert got["a"].tolist() == [] and got["b"].tolist() == [3, 4] and got["c"] == b""
    assert loads_pickle(pickle.dumps(b"", protocol=2), "x") == b""


def test_bytes_with_arguments_is_refused():
    with pytest.raises(UnsafePickleError, match="x: refused, the pickle names builtins.bytes with arguments"):
        loads_pickle(b"\x80\x02c__builtin__\nbytes\nK\x05\x85R.", "x")
