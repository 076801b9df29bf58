"""Atomic writing: one-line errors on a failed write, no temporaries left, the umask honoured, stale
temporaries of a killed writer cleaned, fsync before the rename."""

import errno
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

from bctkit.errors import FileFormatError
from bctkit.storage import atomic_path, save_tensors, write_json, write_text


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


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
