"""safe_pickle: plain data and numeric arrays come back under every protocol; any other global, an
object dtype or a truncated pickle is a one-line error, and nothing the pickle names is run."""

import os
import pickle

import numpy as np
import pytest

from bctkit.errors import FileFormatError
from bctkit.storage.safe_pickle import UnsafePickleError, load_pickle, loads_pickle

from .py2_pickle import py2_pickle


class _Touch:
    """Unpickling this would run ``os.system``: a pickle naming a global that must never be called."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", range(6))
def test_round_trip_every_protocol(protocol):
    rng = np.random.default_rng(protocol)
    obj = {"u8": rng.integers(0, 256, (4, 7), dtype=np.uint8),
           "f32": rng.normal(size=(3, 2)).astype(np.float32), "f64": rng.normal(size=5),
           "fortran": np.asfortranarray(rng.normal(size=(3, 4))),
           "scalar": np.float32(1.5), "labels": [1, 2, 3], "name": "batch", b"raw": b"\x00\xff",
           "nested": {"t": (1, None, True), "x": 2.5}}
    back = loads_pickle(pickle.dumps(obj, protocol=protocol), "mem", arrays=True)
    assert set(back) == set(obj)
    for key in ("u8", "f32", "f64", "fortran"):
        assert back[key].dtype == obj[key].dtype and np.array_equal(back[key], obj[key])
    assert back["scalar"] == np.float32(1.5) and back["scalar"].dtype == np.float32
    assert back["labels"] == [1, 2, 3] and back["name"] == "batch" and back[b"raw"] == b"\x00\xff"
    assert back["nested"] == {"t": (1, None, True), "x": 2.5}


def test_plain_data_needs_no_numpy_without_arrays():
    assert loads_pickle(pickle.dumps({"a": [1, "x", b"y"]}, protocol=2), "mem") == {"a": [1, "x", b"y"]}
    with pytest.raises(UnsafePickleError, match=r"mem: refused, the pickle names numpy"):
        loads_pickle(pickle.dumps(np.zeros(2), protocol=4), "mem")


def test_python2_pickle_latin1():
    data = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    data[0, 0] = 0xFF  # bytes above 127 survive the latin1 round trip
    back = loads_pickle(py2_pickle({"data": data, "labels": [0, 7, 255], "batch_label": "b\xe9"}), "py2",
                        arrays=True, encoding="latin1")
    assert set(back) == {"data", "labels", "batch_label"}
    assert back["data"].dtype == np.uint8 and np.array_equal(back["data"], data)
    assert back["labels"] == [0, 7, 255] and back["batch_label"] == "b\xe9"
    floats = np.linspace(-1, 1, 6).astype(np.float32).reshape(2, 3)
    assert np.array_equal(loads_pickle(py2_pickle({"f": floats}), "py2", arrays=True)["f"], floats)


def test_global_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"data": np.zeros(3), "x": _Touch(marker)}, protocol=2))
    refused = r"evil\.pkl: refused, the pickle names (posix|os)\.system"
    with pytest.raises(UnsafePickleError, match=refused) as err:
        load_pickle(path, arrays=True)
    assert "\n" not in str(err.value) and not marker.exists()


@pytest.mark.parametrize("obj", [np.array([{"a": 1}], dtype=object), np.array([1, "x"], dtype=object)])
def test_object_dtype_refused(obj):
    with pytest.raises(UnsafePickleError, match="object dtype"):
        loads_pickle(pickle.dumps(obj, protocol=2), "obj", arrays=True)


@pytest.mark.parametrize("protocol", [2, 5])
def test_truncated_and_missing(tmp_path, protocol):
    obj = {"data": np.arange(100, dtype=np.uint8), "labels": list(range(10))}
    data = pickle.dumps(obj, protocol=protocol)
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[: len(data) // 2])
    cut = r"cut\.pkl: (truncated or corrupt|not a readable) pickle"
    with pytest.raises(FileFormatError, match=cut) as err:
        load_pickle(path, arrays=True)
    assert "\n" not in str(err.value)
    with pytest.raises(FileFormatError, match=r"none\.pkl: not found"):
        load_pickle(tmp_path / "none.pkl")


def test_empty_bytes_and_empty_arrays_of_protocol_2():
    """Protocol 2 spells empty bytes ``bytes()`` (e.g. inside an empty numpy array): read."""
    data = pickle.dumps({"a": np.array([], np.int64), "b": np.array([3, 4]), "c": b""}, protocol=2)
    got = loads_pickle(data, "x", arrays=True)
    assert got["a"].tolist() == [] and got["b"].tolist() == [3, 4] and got["c"] == b""
    assert loads_pickle(pickle.dumps(b"", protocol=2), "x") == b""


def test_bytes_with_arguments_is_refused():
    with pytest.raises(UnsafePickleError, match="x: refused, the pickle names builtins.bytes with arguments"):
        loads_pickle(b"\x80\x02c__builtin__\nbytes\nK\x05\x85R.", "x")
