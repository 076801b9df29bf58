"""Checks of what a gallery store takes (ids, vectors, JSON, certificates), its declared versions,
and :class:`GalleryError`: the one-line errors every gallery call raises for refused input."""

from __future__ import annotations

import errno
import json
import sqlite3
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from bctkit.errors import BctkitError
from bctkit.gallery.idmap import Hashed, hash_ids

CERTIFICATE_FORMAT = "bctkit-compatibility-certificate"

class GalleryError(BctkitError, ValueError):
    """A gallery call was refused: bad vectors or ids, unknown version, search without certificate."""


class Version(NamedTuple):
    """A declared model version as stored (``vid`` is its row in the store)."""

    vid: int
    fingerprint: str
    name: str | None
    dim: int
    layout: dict | None
    count: int

    @property
    def label(self) -> str:
        """"name (fingerprint)" for messages."""
        return f"{self.name} ({self.fingerprint})" if self.name else self.fingerprint


def find_version(versions: Sequence[Version], fingerprint: Any, what: str) -> Version:
    """The version ``fingerprint`` among the declared ``versions``; an unknown one is refused."""
    for v in versions:
        if v.fingerprint == fingerprint:
            return v
    raise GalleryError(f"{what}: unknown version {fingerprint!r}; declare it with add_version first")


def check_declaration(fingerprint: Any, dim: Any, name: Any, layout: Any) -> dict:
    """{"dim", "name", "layout"} of a version declaration, each checked (the layout as its JSON
    round trip, the form a store keeps); refused in one line."""
    if not isinstance(fingerprint, str) or not fingerprint:
        raise GalleryError(f"add_version: fingerprint must be a non-empty string, got {fingerprint!r}")
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
        raise GalleryError(f"add_version {fingerprint}: dim must be a positive integer, got {dim!r}")
    if name is not None and not isinstance(name, str):
        raise GalleryError(f"add_version {fingerprint}: name must be a string, got {name!r}")
    if layout is not None and not isinstance(layout, dict):
        raise GalleryError(f"add_version {fingerprint}: layout must be a dict, got {type(layout).__name__}")
    kept = None if layout is None else json.loads(to_json(layout, f"add_version {fingerprint}: layout"))
    return {"dim": int(dim), "name": name, "layout": kept}


def settled(fingerprint: str, old: dict | None, wanted: dict) -> bool:
    """Whether the stored declaration ``old`` ({"dim", "name", "layout"}, None: none yet) already says
    all of ``wanted``; a field both give differently is refused."""
    if old is None:
        return False
    for field in ("dim", "name", "layout"):
        if wanted[field] is not None and old[field] is not None and wanted[field] != old[field]:
            raise GalleryError(f"add_version {fingerprint}: declared with {field} {old[field]!r}, "
                               f"now {wanted[field]!r}")
    return all(wanted[f] is None or old[f] is not None for f in ("name", "layout"))


def metadata_json(metadata: Sequence[dict] | None, n: int) -> list[str] | None:
    """Each of ``n`` items' metadata dict as compact JSON (None when none is given); refused in one
    line when the count differs, an entry is not a dict or is not JSON serialisable."""
    if metadata is None:
        return None
    metadata = list(metadata)
    if len(metadata) != n:
        raise GalleryError(f"add: {len(metadata)} metadata entries for {n} ids")
    if not all(isinstance(m, dict) for m in metadata):
        raise GalleryError("add: each metadata entry must be a dict")
    return [to_json(m, "add: metadata") for m in metadata]


def few(items: Sequence[Any], n: int = 3) -> str:
    """The first few of ``items`` for an error message, with the total when there are more."""
    head = ", ".join(repr(x) for x in items[:n])
    return head + (f" (and {len(items) - n} more)" if len(items) > n else "")


def id_list(ids: Sequence[str], what: str) -> tuple[list[str], np.ndarray]:
    """``ids`` as a list of non-empty strings, and their lengths in characters."""
    if isinstance(ids, str | bytes):
        raise GalleryError(f"{what}: ids must be a sequence of strings, got a single {type(ids).__name__}")
    out = list(ids)
    try:  # fast test: str.__len__ refuses anything but a string
        lengths = np.fromiter(map(str.__len__, out), dtype=np.int64, count=len(out))
        ok = not len(out) or int(lengths.min()) > 0
    except TypeError:
        ok = False
    if not ok:
        bad = [i for i in out if not isinstance(i, str) or not i]
        raise GalleryError(f"{what}: ids must be non-empty strings, got {few(bad)}")
    return out, lengths


def check_unique(ids: list[str], hashed: Hashed, what: str) -> None:
    """Refuse ``ids`` (hashed: their :class:`Hashed`) when one appears twice."""
    hs = hashed.values[hashed.order]
    if (hs[1:] == hs[:-1]).any() and len(set(ids)) != len(ids):  # equal hashes: maybe equal ids
        seen: set[str] = set()
        dup = [i for i in ids if i in seen or seen.add(i)]
        raise GalleryError(f"{what}: duplicate ids within one call: {few(list(dict.fromkeys(dup)))}")


def check_ids(ids: Sequence[str], what: str) -> tuple[list[str], Hashed]:
    """``ids`` as a list of non-empty strings without duplicates, and their hashes."""
    out, lengths = id_list(ids, what)
    hashed = hash_ids(out, lengths)
    check_unique(out, hashed, what)
    return out, hashed


def check_vectors(vectors: Any, n: int | None, v: Version, what: str) -> np.ndarray:
    """``vectors`` as finite float32 C-ordered rows [n, v.dim] (n None: any number of rows)."""
    arr = np.asarray(vectors)
    if arr.dtype.kind not in "fiu":
        raise GalleryError(f"{what}: vectors must be numeric, got dtype {arr.dtype}")
    n = (arr.shape[0] if arr.ndim else 1) if n is None else n
    if arr.shape != (n, v.dim):
        raise GalleryError(f"{what}: vectors of version {v.label} must have shape ({n}, {v.dim}), "
                           f"got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype="<f4")
    if n and np.isfinite(arr @ np.ones(v.dim, np.float32)).all():  # NaN and Inf reach the row sums
        return arr
    step = max(1, (1 << 22) // v.dim)
    for s in range(0, n, step):
        finite = np.isfinite(arr[s : s + step]).all(axis=1)
        if not finite.all():
            raise GalleryError(f"{what}: vector {s + int(np.argmin(finite))} contains NaN or Inf")
    return arr


def check_priors(priors: Any, n: int) -> np.ndarray | None:
    """``priors`` as float64 [n], each finite and >= 0 (None stays None)."""
    if priors is None:
        return None
    arr = np.asarray(priors, dtype=np.float64).ravel()
    if arr.shape != (n,) or not (np.isfinite(arr) & (arr >= 0)).all():
        raise GalleryError(f"replace: priors must be {n} finite values >= 0, got "
                           f"{np.asarray(priors).shape} with min {np.nanmin(arr) if arr.size else None}")
    return arr


def to_json(obj: Any, what: str) -> str:
    """Compact strict JSON of ``obj``; refused when it is not serialisable (NaN included)."""
    try:
        return json.dumps(obj, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise GalleryError(f"{what}: not JSON serialisable ({exc})") from None


def check_certificate(versions: Sequence[Version], cert: Any) -> tuple[Version, Version, str, str]:
    """(query version, gallery version, sha256, JSON body) of a passed certificate whose versions are
    declared with its dims; anything else is refused."""
    if not isinstance(cert, dict) or cert.get("format") != CERTIFICATE_FORMAT:
        raise GalleryError(f"certificate: not a {CERTIFICATE_FORMAT} dict")
    sha = cert.get("sha256")
    if not isinstance(sha, str) or not sha:
        raise GalleryError("certificate: the certificate has no sha256")
    what = f"certificate {sha[:12]}"
    if cert.get("passed") is not True:
        raise GalleryError(f"{what}: the compatibility criterion failed (passed: {cert.get('passed')!r}); "
                           "only a passed certificate allows mixed-version search")
    body = to_json(cert, what)
    sides = []
    for side in ("query", "gallery"):
        info = cert.get(side)
        if not isinstance(info, dict):
            raise GalleryError(f"{what}: no {side} model")
        v = find_version(versions, info.get("fingerprint"), f"{what} {side}")
        if info.get("embedding_dim") != v.dim:
            raise GalleryError(f"{what}: {side} embedding_dim {info.get('embedding_dim')!r} but version "
                               f"{v.label} has dim {v.dim}")
        dims = cert.get(f"{side}_dims")
        if (not isinstance(dims, list | tuple) or len(dims) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims)
                or not 0 <= dims[0] < dims[1] <= v.dim):
            raise GalleryError(f"{what}: {side}_dims {dims!r} is not a [start, end) range within 0..{v.dim}")
        sides.append((v, dims))
    (q, qd), (g, gd) = sides
    if qd[1] - qd[0] != gd[1] - gd[0]:
        raise GalleryError(f"{what}: query_dims {list(qd)} and gallery_dims {list(gd)} differ in length")
    return q, g, sha, body


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (FAISS errors span several lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def reason(exc: OSError | sqlite3.Error) -> str:
    """Why a file operation failed, in a few words; a full disk (ENOSPC, or SQLite's SQLITE_FULL)
    says so plainly."""
    if isinstance(exc, sqlite3.Error):
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return f"no space left on the device: {first_line(exc)}"
        return first_line(exc)
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return exc.strerror or str(exc)
