"""The gallery store's items as segments, and the in-memory view of them that every call reads.

A segment is one row of table ``segments``, written by one add, replace or delete call (a call
writes several when its vectors exceed :data:`CHUNK_BYTES`): version id (NULL: a tombstone), item
count ``n``, the int64 keys (``first_key`` alone when they are ``first_key .. first_key + n - 1``,
else a little-endian int64 ``keys`` blob), the ids (an add only: their UTF-8 bytes concatenated in
``ids`` and n + 1 little-endian int64 byte offsets in ``id_offsets``), the metadata (an add only:
a JSON list of n objects, or NULL when none was given) and the vectors (float32 little-endian,
row-major [n, dim]). An add segment introduces new keys; a replace segment gives existing keys new
vectors and a new version (their ids and metadata stay in the add segment); a tombstone deletes
its keys. The live entry of a key is its newest segment entry. Segments are never rewritten, so a
reader brings its view up to date by reading the segments numbered above the last one it saw.

Why rows of 1 MiB of vectors: SQLite copies a row's value several times before it reaches the
file, and a row of tens of MiB writes at well under the disk's speed; the vectors of a row are
written in place through incremental blob I/O (one copy fewer than binding them). Measured here
on 1M x 128 float32 in 100k-item commits (64 KiB pages): 1.04 s in 51 MiB rows, 0.59 s in 1 MiB
rows with bound bytes and a 256 MiB page cache, 0.44 s in place with an 8 MiB cache (see
:mod:`.schema`); the same bytes written to a plain file and fsynced took 0.44-0.65 s.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import numpy as np

from bctkit.errors import FileFormatError
from bctkit.gallery.checks import GalleryError, few
from bctkit.gallery.idmap import Hashed, IdMap, hash_ids

CHUNK_BYTES = 1 << 20
"""At most this many bytes of vectors per segment row (at least one item)."""

INSERT = ("INSERT INTO segments (vid, n, first_key, keys, ids, id_offsets, meta, vec) "
          "VALUES (?, ?, ?, ?, ?, ?, ?, zeroblob(?))")
"""A segment with room for its vectors (written next through incremental blob I/O)."""
INSERT_TOMBSTONE = "INSERT INTO segments (vid, n, first_key, keys) VALUES (NULL, ?, ?, ?)"


Pending = tuple[int, "int | None", np.ndarray, "list[str] | None"]
"""A segment written in the open transaction: (seg, version id or None, keys, ids or None)."""


def chunks(n: int, dim: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of one call's segments."""
    step = max(1, CHUNK_BYTES // (4 * max(dim, 1)))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def write_segments(conn: sqlite3.Connection, vid: int | None, keys: np.ndarray, vec: np.ndarray | None,
                   ids: list[str] | None = None, lengths: np.ndarray | None = None,
                   metas: list[str] | None = None) -> list[Pending]:
    """Write one call's items as segments of at most CHUNK_BYTES of vectors each (ids, their
    lengths in characters and metadata JSON texts: an add's; no vectors: a tombstone)."""
    dim = vec.shape[1] if vec is not None else 0
    if ids is not None and lengths is not None:
        data, offsets = encode_ids(ids, lengths, "add")
    out: list[Pending] = []
    for a, b in chunks(len(keys), dim) if vec is not None else [(0, len(keys))]:
        first, kb = encode_keys(keys[a:b])
        id_blob = off = None
        if ids is not None:
            id_blob = data[offsets[a] : offsets[b]]
            off = (offsets[a : b + 1] - offsets[a]).tobytes()
        meta = "[" + ",".join(metas[a:b]) + "]" if metas is not None else None
        if vec is None:
            cur = conn.execute(INSERT_TOMBSTONE, (b - a, first, kb))
        else:  # the vectors written in place: one copy fewer than binding them
            cur = conn.execute(INSERT, (vid, b - a, first, kb, id_blob, off, meta, vec[a:b].nbytes))
            with conn.blobopen("segments", "vec", cur.lastrowid) as blob:
                blob.write(vec[a:b].data)
        out.append((int(cur.lastrowid), vid, keys[a:b], ids[a:b] if ids is not None else None))
    return out


def encode_ids(ids: Sequence[str], lengths: np.ndarray, what: str) -> tuple[bytes, np.ndarray]:
    """(UTF-8 bytes of ``ids`` concatenated, n + 1 int64 byte offsets); ``lengths``: their lengths
    in characters."""
    joined = "".join(ids)
    try:
        data = joined.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise GalleryError(f"{what}: ids must be valid Unicode text ({exc.reason})") from None
    if len(data) != len(joined):  # not ASCII: byte lengths differ from character lengths
        lengths = np.fromiter((len(i.encode("utf-8")) for i in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype="<i8")
    np.cumsum(lengths, out=offsets[1:])
    return data, offsets


def encode_keys(keys: np.ndarray) -> tuple[int, bytes | None]:
    """(first_key, keys blob or None when the keys are consecutive)."""
    first = int(keys[0])
    if int(keys[-1]) - first == len(keys) - 1 and (len(keys) < 2 or bool((np.diff(keys) == 1).all())):
        return first, None
    return first, np.ascontiguousarray(keys, dtype="<i8").tobytes()


class View:
    """One open store's in-memory index of its segments: id -> key (:class:`IdMap`), and per key
    its id, its live segment and row, its version and its add segment and row (its metadata's place).

    Keys are dense (0, 1, 2, ...: an add takes the next ones in the same transaction that records
    them), so per-key data are arrays indexed by key; a dead key has version -1. ``commit`` is the
    store's commit counter the view reflects and ``last_seg`` the newest segment read.
    """

    def __init__(self) -> None:
        self.commit = -1
        self.last_seg = 0
        self.idmap = IdMap()
        self.key_id: list[str] = []
        self.seg = np.zeros(0, np.int64)
        self.row = np.zeros(0, np.int64)
        self.vid = np.zeros(0, np.int64)
        self.home = np.zeros((0, 2), np.int64)
        self.counts: dict[int, int] = {}

    # ---- reading the file -------------------------------------------------------------------------

    def refresh(self, conn: sqlite3.Connection, db: Any) -> None:
        """Read the segments committed since the view was last brought up to date (inside the
        caller's transaction)."""
        commit = int(conn.execute("SELECT value FROM meta WHERE key='commit'").fetchone()[0])
        if commit == self.commit:
            return
        try:
            dims = dict(conn.execute("SELECT vid, dim FROM versions"))
            cur = conn.execute("SELECT seg, vid, n, first_key, keys, ids, id_offsets, length(vec) "
                               "FROM segments WHERE seg > ? ORDER BY seg", (self.last_seg,))
            new_ids: list[str] = []
            new_keys: list[np.ndarray] = []
            for seg, vid, n, first, kb, ib, ob, vlen in cur:
                self._check(db, seg, vid, n, first, kb, ib, ob, vlen, dims)
                keys = (np.arange(first, first + n, dtype=np.int64) if kb is None
                        else np.frombuffer(kb, dtype="<i8").astype(np.int64))
                try:
                    ids = None if ib is None else decode_ids(ib, ob)
                except UnicodeDecodeError:
                    msg = f"{db}: corrupt gallery store (segment {seg}: ids not UTF-8)"
                    raise FileFormatError(msg) from None
                self.apply(seg, vid, keys, ids, db)
                if ids is not None:
                    new_ids += ids
                    new_keys.append(keys)
            if new_ids:
                self.idmap.add(hash_ids(new_ids), np.concatenate(new_keys))
        except BaseException:
            self.__init__()  # type: ignore[misc]  # half read: start again from nothing next time
            raise
        self.commit = commit

    @staticmethod
    def _check(db: Any, seg: int, vid: int | None, n: Any, first: Any, kb: Any, ib: Any, ob: Any, vlen: Any,
               dims: dict[int, int]) -> None:
        """Refuse a segment row whose fields contradict each other (a damaged file)."""
        bad = None
        if not isinstance(n, int) or n < 1:
            bad = f"n {n!r}"
        elif kb is None and not isinstance(first, int):
            bad = "no keys"
        elif kb is not None and (not isinstance(kb, bytes) or len(kb) != 8 * n):
            bad = "keys blob length"
        elif vid is not None and vid not in dims:
            bad = f"unknown version id {vid}"
        elif vid is not None and vlen != 4 * n * dims[vid]:
            bad = "vector blob length"
        elif (ib is None) != (ob is None) or (ib is not None and (
                not isinstance(ib, bytes) or not isinstance(ob, bytes) or len(ob) != 8 * (n + 1))):
            bad = "ids blob"
        if bad is None and ob is not None:
            off = np.frombuffer(ob, dtype="<i8")
            if off[0] != 0 or off[-1] != len(ib) or (np.diff(off) < 0).any():
                bad = "id offsets"
        if bad is not None:
            raise FileFormatError(f"{db}: corrupt gallery store (segment {seg}: {bad})")

    def apply(self, seg: int, vid: int | None, keys: np.ndarray, ids: list[str] | None, db: Any) -> None:
        """Take one segment (this process's own after its commit, or one read from the file); the
        ids of an add segment are then recorded in :attr:`idmap` by the caller, for many segments
        at once."""
        self.last_seg = max(self.last_seg, seg)
        n = len(keys)
        rows = np.arange(n, dtype=np.int64)
        if ids is not None:  # an add: new keys, next in line
            k0 = len(self.key_id)
            if vid is None or len(ids) != n or not np.array_equal(keys, np.arange(k0, k0 + n)):
                raise FileFormatError(f"{db}: corrupt gallery store (segment {seg}: keys out of order)")
            self._grow(k0 + n)
            self.key_id.extend(ids)
            where: slice | np.ndarray = slice(k0, k0 + n)
            self.home[where, 0], self.home[where, 1] = seg, rows
        else:
            if n and (int(keys.min()) < 0 or int(keys.max()) >= len(self.key_id)):
                raise FileFormatError(f"{db}: corrupt gallery store (segment {seg}: unknown keys)")
            old = self.vid[keys]
            if (old < 0).any():
                raise FileFormatError(f"{db}: corrupt gallery store (segment {seg}: a deleted key)")
            for u, c in zip(*np.unique(old, return_counts=True), strict=True):
                self.counts[int(u)] -= int(c)
            where = keys
        if vid is None:  # a tombstone
            self.vid[where], self.seg[where] = -1, -1
            return
        self.seg[where], self.row[where], self.vid[where] = seg, rows, vid
        self.counts[vid] = self.counts.get(vid, 0) + n

    def _grow(self, size: int) -> None:
        if size <= len(self.seg):
            return
        cap = max(size, 2 * len(self.seg), 1024)
        for name in ("seg", "row", "vid"):
            arr = np.full(cap, -1, np.int64)
            arr[: len(getattr(self, name))] = getattr(self, name)
            setattr(self, name, arr)
        home = np.full((cap, 2), -1, np.int64)
        home[: len(self.home)] = self.home
        self.home = home

    # ---- lookups ----------------------------------------------------------------------------------

    def lookup(self, ids: Sequence[str], hashed: Hashed) -> np.ndarray:
        """The live key of each of ``ids`` (``hashed``: their hashes), -1 for an id no live item has."""
        out = np.full(len(ids), -1, np.int64)
        pos, cand = self.idmap.candidates(hashed)
        alive = self.vid[cand] >= 0
        pos, cand = pos[alive], cand[alive]
        key_id = self.key_id
        same = np.fromiter((key_id[k] == ids[p] for p, k in zip(pos.tolist(), cand.tolist(), strict=True)),
                           dtype=bool, count=len(pos))
        out[pos[same]] = cand[same]
        return out

    def keys_of(self, ids: Sequence[str], what: str, hashed: Hashed | None = None) -> np.ndarray:
        """Keys of ``ids``; unknown ids are named."""
        keys = self.lookup(ids, hash_ids(ids) if hashed is None else hashed)
        if (keys < 0).any():
            missing = [i for i, k in zip(ids, keys.tolist(), strict=True) if k < 0]
            raise GalleryError(f"{what}: {len(missing)} unknown id(s): {few(missing)}")
        return keys

    def ids_of(self, keys: np.ndarray) -> list[str]:
        """Ids of live ``keys``."""
        return [self.key_id[k] for k in keys.tolist()]

    def name(self, key: int) -> str:
        """The id of ``key``, or "" when it is no live item's."""
        return self.key_id[key] if 0 <= key < len(self.key_id) and self.vid[key] >= 0 else ""

    def live(self, vid: int | None = None) -> np.ndarray:
        """Live keys (of version ``vid``), in insertion order."""
        vids = self.vid[: len(self.key_id)]
        return np.flatnonzero(vids >= 0 if vid is None else vids == vid).astype(np.int64)

    def vectors(self, conn: sqlite3.Connection, keys: np.ndarray, dim: int, db: Any) -> np.ndarray:
        """float32 [len(keys), dim] vectors of live ``keys`` whose versions all have ``dim``. A vector
        holding NaN or Inf (bytes damaged on disk: the store takes finite vectors only) is refused,
        naming its item, rather than handed on (an index would drop it silently)."""
        out = self.raw_vectors(conn, keys, dim)
        bad = damaged(out)
        if len(bad):
            raise FileFormatError(f"{db}: corrupt gallery store ({len(bad)} damaged item(s): vectors "
                                  f"holding NaN or Inf: {few(self.ids_of(keys[bad]))})")
        return out

    def raw_vectors(self, conn: sqlite3.Connection, keys: np.ndarray, dim: int) -> np.ndarray:
        """:meth:`vectors` as stored, unchecked."""
        out = np.empty((len(keys), dim), np.float32)
        for seg, where in _groups(self.seg[keys]):
            blob = conn.execute("SELECT vec FROM segments WHERE seg=?", (seg,)).fetchone()[0]
            out[where] = np.frombuffer(blob, dtype="<f4").reshape(-1, dim)[self.row[keys[where]]]
        return out

    def digest(self, conn: sqlite3.Connection) -> str:
        """A cheap fingerprint of the items read so far: every segment's fields and the first 16
        bytes of its vectors. Binds a cached index to the store it was built from (another
        store's vectors give another digest) without reading the vectors."""
        h = hashlib.sha256()
        rows = conn.execute("SELECT seg, vid, n, first_key, keys, length(vec) FROM segments WHERE seg <= ? "
                            "ORDER BY seg", (self.last_seg,))
        for seg, vid, n, first, kb, vlen in rows:
            h.update(repr((seg, vid, n, first, vlen)).encode())
            h.update(kb or b"")
            if vlen:
                with conn.blobopen("segments", "vec", seg, readonly=True) as blob:
                    h.update(blob.read(16))
        return h.hexdigest()

    def priors(self, conn: sqlite3.Connection, keys: np.ndarray) -> np.ndarray:
        """The prior each live key's replace was given (its live segment's ``meta``: a JSON list of
        numbers), -1 where none was (an add segment, or a replace without priors)."""
        out = np.full(len(keys), -1.0)
        live, homes = self.seg[keys], self.home[keys, 0]
        replaced = np.flatnonzero(live != homes)
        for seg, where in _groups(live[replaced]):
            text = conn.execute("SELECT meta FROM segments WHERE seg=?", (seg,)).fetchone()[0]
            if text is None:
                continue
            values = np.asarray(json.loads(text), dtype=np.float64)
            out[replaced[where]] = values[self.row[keys[replaced[where]]]]
        return out

    def metadata(self, conn: sqlite3.Connection, keys: np.ndarray) -> list[dict]:
        """The metadata dict of each live key ({} when none was given)."""
        out: list[dict] = [{} for _ in range(len(keys))]
        homes = self.home[keys]
        for seg, where in _groups(homes[:, 0]):
            text = conn.execute("SELECT meta FROM segments WHERE seg=?", (seg,)).fetchone()[0]
            if text is None:
                continue
            entries = json.loads(text)
            for w, r in zip(where.tolist(), homes[where, 1].tolist(), strict=True):
                out[w] = entries[r]
        return out


def decode_ids(data: bytes, offsets: bytes) -> list[str]:
    """The ids of one add segment."""
    off = np.frombuffer(offsets, dtype="<i8").tolist()
    text = data.decode("utf-8")
    if len(text) == len(data):  # ASCII: byte offsets are character offsets
        return [text[a:b] for a, b in zip(off[:-1], off[1:], strict=True)]
    return [data[a:b].decode("utf-8") for a, b in zip(off[:-1], off[1:], strict=True)]


def damaged(x: np.ndarray) -> np.ndarray:
    """Rows of float32 ``x`` [n, d] holding NaN or Inf (one matrix-vector product when none does)."""
    if not x.size:
        return np.zeros(0, np.int64)
    sums = np.isfinite(x @ np.ones(x.shape[1], np.float32))  # NaN and Inf reach the row sums
    if sums.all():
        return np.zeros(0, np.int64)
    rows = np.flatnonzero(~sums)
    return rows[~np.isfinite(x[rows]).all(axis=1)]  # a finite row may overflow its sum


def _groups(values: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(value, positions holding it) for each distinct value, in increasing order."""
    if not len(values):
        return []
    order = np.argsort(values, kind="stable")
    cuts = np.flatnonzero(np.diff(values[order])) + 1
    return [(int(values[g[0]]), g) for g in np.split(order, cuts)]
