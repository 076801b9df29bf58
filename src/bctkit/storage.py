"""Atomic file writing and safetensors tensor files with JSON metadata (never pickle).

Every file bctkit writes goes through :func:`atomic_path`: it is written to a temporary file in the
target's folder (``.<name>.<host>-<pid>-<random>.tmp``), flushed to disk and renamed onto the target,
so a reader never sees half a file. The file gets the permissions ``open()`` would give a new file
(0666 less the umask). Temporaries that a killed writer left behind are removed the next time their
target is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from bctkit.errors import BctkitError, FileFormatError

META_KEY = "bctkit"

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


def cache_home() -> Path:
    """Root of bctkit's caches (rendered glyphs, dataset scans): $BCTKIT_CACHE, else ~/.cache/bctkit."""
    return Path(os.environ.get("BCTKIT_CACHE") or "~/.cache/bctkit").expanduser()


def check_writable_dir(path: str | os.PathLike[str], what: str) -> None:
    """Refuse, before any work and without creating anything, an output folder ``path`` that could
    not be written: it (or its nearest existing parent, where it would be made) must be a writable
    folder. ``what`` names the option in the one-line error."""
    p = Path(path).expanduser().absolute()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        raise FileFormatError(f"{what} {path}: cannot be a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FileFormatError(f"{what} {path}: {existing} is not writable")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented strict JSON, atomically: NaN and Inf (not measurable) become null,
    since strict JSON parsers reject the NaN literal."""
    write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy / torch scalars as Python numbers, paths as strings, tuples as lists and every
    NaN or Inf as None, ready for strict JSON."""
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return json_safe(obj.item())
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


MAX_JSON_DEPTH = 100
"""Deepest nesting of objects and lists bctkit reads from a JSON file (its own files nest a few
levels); deeper input is refused on one line rather than exhausting the recursion of later code."""


def read_json(path: str | os.PathLike[str], *, allow_nan: bool = False) -> Any:
    """Read a JSON file, with a one-line :class:`FileFormatError` naming the file when it is missing,
    unreadable, corrupt, nested deeper than :data:`MAX_JSON_DEPTH`, or (unless ``allow_nan``: reports
    of older bctkit versions hold NaN for values not measurable) has a NaN or Infinity, which strict
    JSON has not; the message names the field."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileFormatError(f"{path}: file not found") from None
    except RecursionError:
        raise FileFormatError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise FileFormatError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    problem = json_problem(obj, allow_nan)
    if problem:
        raise FileFormatError(f"{path}: {problem}")
    return obj


def json_problem(obj: Any, allow_nan: bool = False) -> str | None:
    """What makes parsed JSON ``obj`` unusable, or None: nesting deeper than :data:`MAX_JSON_DEPTH`,
    or (unless ``allow_nan``) a NaN or infinite number, named by its field (``a.b[2]``). Walks
    iteratively, so any depth is checked without recursion."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, float) and not allow_nan and not math.isfinite(value):
            literal = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
            return (f"field '{where or '(the whole document)'}' is {literal}; expected a finite number or "
                    "null (strict JSON has no NaN or Infinity)")
        if isinstance(value, dict | list):
            if depth >= MAX_JSON_DEPTH:
                return f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
            items = value.items() if isinstance(value, dict) else enumerate(value)
            children = [(v, _field(where, k, isinstance(value, list)), depth + 1) for k, v in items]
            stack.extend(reversed(children))
    return None


def _field(parent: str, key: Any, index: bool) -> str:
    """The path of a child in :func:`json_problem`'s messages: ``a.b`` for a key, ``a[2]`` for an index."""
    if index:
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def save_tensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Save tensors as safetensors with ``meta`` embedded as JSON in the header, atomically; a failed
    write (disk full) is a one-line :class:`FileFormatError` and leaves no partial file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {META_KEY: json.dumps(meta, default=_json_default)}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=header)
        except SafetensorError as exc:
            raise FileFormatError(f"{path}: could not write ({exc})") from None


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file written by :func:`save_tensors`; returns (tensors, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, _decode_meta(raw, path)


def read_header(path: str | os.PathLike[str]) -> tuple[list[str], dict[str, Any]]:
    """(tensor names, bctkit metadata) of a safetensors file from its header alone: no tensor is
    read. Metadata that is not a JSON object reads as {}; an unreadable file or corrupt metadata is a
    one-line :class:`FileFormatError`."""
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            names = list(fh.keys())
            raw = (fh.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise FileFormatError(f"{path}: not a readable safetensors file ({first})") from None
    meta = _decode_meta(raw, path)
    return names, meta if isinstance(meta, dict) else {}


def _decode_meta(raw: str | None, path: Path) -> Any:
    """The bctkit metadata string of a header as JSON ({} when absent)."""
    try:
        return json.loads(raw) if raw is not None else {}
    except json.JSONDecodeError:
        raise FileFormatError(f"{path}: corrupt bctkit metadata in safetensors header") from None
