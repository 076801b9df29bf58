"""Atomic file writing: every file bctkit writes goes through :func:`atomic_path`.

A file is written to a temporary in the target's folder (``.<name>.<host>-<pid>-<random>.tmp``),
flushed to disk and renamed onto the target, so a reader never sees half a file. The file gets the
permissions ``open()`` would give a new file (0666 less the umask). Temporaries that a killed writer
left behind are removed the next time their target is written.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bctkit.errors import BctkitError, FileFormatError

TMP_SUFFIX = ".tmp"
STALE_FOREIGN_S = 3600.0
"""A temporary whose writer cannot be asked (on another machine) counts as stale after this long
without a write."""
_LEGACY_TMP = re.compile(r"[a-z0-9_]{8}")  # mkstemp's random part, in temporaries of older versions


def _host_tag() -> str:
    """This machine's name reduced to letters and digits (no '.' or '-', which separate the parts of a
    temporary's name)."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _tmp_owner(name: str, target: str) -> tuple[str, int] | None:
    """(host, pid) of the writer of temporary ``name`` if it is one of ``target``'s, else None.
    Temporaries of bctkit versions before this naming (``mkstemp``: 8 random characters) have host
    "" and pid 0: their writer cannot be asked."""
    prefix = f".{target}."
    if not (name.startswith(prefix) and name.endswith(TMP_SUFFIX)):
        return None
    middle = name[len(prefix) : -len(TMP_SUFFIX)]
    if _LEGACY_TMP.fullmatch(middle):
        return "", 0
    parts = middle.split("-")
    if len(parts) != 3 or not parts[0].isalnum() or not parts[1].isdigit() or not parts[2].isalnum():
        return None
    return parts[0], int(parts[1])


def _process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (False when that cannot be told)."""
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of ``path`` left by a writer that was killed: on this machine those whose
    process is gone; from another machine (or an older bctkit) those not written to for
    :data:`STALE_FOREIGN_S`. Temporaries of other files, and of writers still running here, are
    never touched."""
    host = _host_tag()
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        owner = _tmp_owner(entry.name, path.name)
        if owner is None:
            continue
        try:
            if owner[0] == host:
                stale = owner[1] != os.getpid() and _process_gone(owner[1])
            else:
                stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_FOREIGN_S
            if stale:
                os.unlink(entry.path)
        except OSError:
            continue  # another writer removed it first, or the folder is read-only: harmless


def _create_temporary(path: Path) -> Path:
    """Create an empty temporary beside ``path`` with the mode ``open()`` would give a new file (the
    kernel applies the umask to 0o666; ``mkstemp`` would create it 0600)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def _fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk, so that the rename never publishes a file whose bytes are lost
    in a crash."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk where the OS allows opening folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems refuse it; the file itself is on disk
            os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; flush it to disk and rename it onto ``path`` only if the
    block succeeds, else remove it. The file keeps the temporary's mode (0666 less the umask) even
    when the block replaced it with a file of its own (safetensors writes 0600 files). An OSError
    (disk full, no permission) becomes a one-line :class:`FileFormatError` naming ``path``."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        tmp = _create_temporary(path)
        mode = stat.S_IMODE(tmp.stat().st_mode)
        yield tmp
        if stat.S_IMODE(tmp.stat().st_mode) != mode:  # replaced by a writer of its own (safetensors)
            os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        if isinstance(exc, BctkitError):
            raise
        raise FileFormatError(f"{path}: could not write ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
