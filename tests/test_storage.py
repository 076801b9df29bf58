"""Atomic writing: one-line errors on a failed write, no temporaries left, the umask honoured, strict
JSON (null for NaN / Inf), stale temporaries of a killed writer cleaned, fsync before the rename."""

import errno
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from bctkit import storage
from bctkit.errors import FileFormatError
from bctkit.storage import atomic_path, load_tensors, read_json, save_tensors, write_json, write_text


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   SafetensorError("Error while serializing: IoError")])
def test_failed_tensor_save_is_one_line_error_and_leaves_nothing(tmp_path, monkeypatch, error):
    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise error

    monkeypatch.setattr(storage, "save_file", full_disk)
    target = tmp_path / "models" / "old.safetensors"
    with pytest.raises(FileFormatError, match=r"models/old\.safetensors: could not write") as exc:
        save_tensors(target, {"w": torch.ones(2)}, {"a": 1})
    assert "\n" not in str(exc.value)
    assert list(target.parent.iterdir()) == []


def test_failed_text_write_is_one_line_error(tmp_path, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(FileFormatError, match=r"r\.json: could not write \(No space left on device\)"):
        write_json(tmp_path / "r.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        write_text(tmp_path / "b.md", "text")
        save_tensors(tmp_path / "c.safetensors", {"w": torch.ones(2)}, {})
        with atomic_path(tmp_path / "d.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.arange(3))
    finally:
        os.umask(old)
    for name in ("a.json", "b.md", "c.safetensors", "d.npy"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_json_is_strict_with_null_for_nan_and_inf(tmp_path):
    obj = {"a": math.nan, "b": [math.inf, 1.5, (-math.inf, 2)], "c": np.float32("nan"),
           "d": torch.tensor(float("-inf")), "e": np.float64(0.25), "f": {"g": np.int64(3)},
           "h": Path("x/y")}
    write_json(tmp_path / "r.json", obj)

    def refuse(name: str) -> None:
        raise ValueError(f"non-strict JSON constant {name}")

    back = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert back == {"a": None, "b": [None, 1.5, [None, 2]], "c": None, "d": None, "e": 0.25,
                    "f": {"g": 3}, "h": "x/y"}


def test_read_json_refuses_nan_infinity_and_deep_nesting_on_one_line(tmp_path):
    """What Python's json accepts but no bctkit file holds: NaN / Infinity (named by field; read as
    they are with allow_nan, as older reports hold NaN) and nesting that would exhaust recursion."""
    cases = {"nan.json": ('{"a": {"b": [1, NaN]}}', "field 'a.b[1]' is NaN"),
             "inf.json": ('[-Infinity]', "field '[0]' is -Infinity"),
             "deep.json": ("[" * 100_000 + "]" * 100_000, "JSON nested deeper than 100 levels"),
             "deep101.json": ("[" * 101 + "]" * 101, "JSON nested deeper than 100 levels")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(FileFormatError) as exc:
            read_json(tmp_path / name)
        assert str(exc.value).startswith(f"{tmp_path / name}: {message}") and "\n" not in str(exc.value)
    back = read_json(tmp_path / "nan.json", allow_nan=True)
    assert back["a"]["b"][0] == 1 and math.isnan(back["a"]["b"][1])
    (tmp_path / "deep100.json").write_text("[" * 100 + "]" * 100)
    assert read_json(tmp_path / "deep100.json") == json.loads("[" * 100 + "]" * 100)


def test_readers_of_user_json_refuse_deep_nesting(tmp_path):
    """The JSON files users hand bctkit outside read_json's direct callers: a run's reports
    (aggregate), a classifier's label map, a run's config.json (None: unreadable)."""
    from bctkit.errors import ConfigError
    from bctkit.oldside.classifier import _read_map
    from bctkit.run.aggregate import load_run
    from bctkit.run.keys import read_config

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "open-data").mkdir()
    (tmp_path / "open-data" / "report.json").write_text(deep)
    with pytest.raises(FileFormatError, match="report.json: JSON nested deeper than 100 levels"):
        load_run(tmp_path)
    (tmp_path / "map.json").write_text(deep)
    with pytest.raises(ConfigError, match="old.classifier.label_map: .*map.json: JSON nested deeper"):
        _read_map(tmp_path / "map.json")
    assert read_config(tmp_path / "map.json") is None


def test_tensor_files_round_trip(tmp_path):
    save_tensors(tmp_path / "t.safetensors", {"w": torch.arange(4.0)}, {"k": [1, 2]})
    tensors, meta = load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(tensors["w"], torch.arange(4.0)) and meta == {"k": [1, 2]}


def test_temporaries_are_named_after_their_target(tmp_path):
    with atomic_path(tmp_path / "report.json") as tmp:
        assert tmp.parent == tmp_path
        assert re.fullmatch(rf"\.report\.json\.{_host()}-{os.getpid()}-[0-9a-f]+\.tmp", tmp.name)
        tmp.write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_stale_temporaries_of_the_same_target_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    host = _host()
    names = {
        "dead": f".report.json.{host}-{dead_pid}-ab12.tmp",  # writer killed: removed
        "alive": f".report.json.{host}-{os.getpid()}-cd34.tmp",  # writer still running: kept
        "other_target": f".report.json.bak.{host}-{dead_pid}-ef56.tmp",  # another file's: kept
        "prefix_target": f".report.{host}-{dead_pid}-ab12.tmp",  # another file's: kept
        "foreign_new": f".report.json.otherhost-{dead_pid}-0a1b.tmp",  # another machine, recent: kept
        "foreign_old": f".report.json.otherhost-{dead_pid}-2c3d.tmp",  # another machine, a day old
        "unrelated": ".report.json.swp",
        "legacy_new": ".report.json.k2j_9x0a.tmp",  # mkstemp's, of an older bctkit, recent: kept
        "legacy_old": ".report.json.p0q1r2s3.tmp",  # the same, a day old: removed
    }
    for name in names.values():
        (tmp_path / name).write_text("partial")
    day_ago = time.time() - 86400
    for key in ("foreign_old", "legacy_old"):
        os.utime(tmp_path / names[key], (day_ago, day_ago))
    write_json(tmp_path / "report.json", {"a": 1})
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"report.json"} | {names[k] for k in ("alive", "other_target", "prefix_target",
                                                          "foreign_new", "unrelated", "legacy_new")}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name file descriptors")
def test_fsync_before_the_rename_and_of_the_folder_after(tmp_path, monkeypatch):
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "r.json"
    write_json(target, {"a": 1})
    kinds = [c[0] for c in calls]
    assert kinds == ["fsync", "replace", "fsync"], calls
    assert Path(calls[0][1]).name.startswith(".r.json.") and calls[0][1].endswith(".tmp")
    assert calls[1][1] == str(target)
    assert Path(calls[2][1]) == tmp_path.resolve()
