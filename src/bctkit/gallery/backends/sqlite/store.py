"""A versioned gallery store on disk: items embedded by several model versions, searched together.

Storage design: one SQLite database (standard library), ``<store>/gallery.sqlite``, is the truth.
Items are written in bulk as segments (:mod:`.segments`): each add, replace or delete
call writes one or a few rows of table ``segments`` holding its items' int64 keys (never reused;
assigned in insertion order, so a lower key is an earlier insertion), ids, metadata and float32
vectors, or a tombstone; ``versions`` holds the declared model versions with their item counts;
``certificates`` the compatibility certificates; ``meta`` the format version, the FAISS factory
string, the next key, a commit counter and the orders each version's backfills used. SQLite's
rollback journal with ``synchronous=FULL`` makes every mutating call one atomic, durable
transaction (the counter is bumped inside it): a crash (SIGKILL, power loss) at any point leaves
the last committed state, restored by SQLite on the next open.

Each open store keeps an in-memory view of the items (id -> key, per key its live segment, row and
version), built at open from the segments' keys and ids (not their vectors) and brought up to date
at the start of every call from the segments committed since, when the commit counter moved. A
write first takes SQLite's write lock (``BEGIN IMMEDIATE``) and then updates the view, so an add's
id check sees every commit of every process and two processes can never add the same id.

The FAISS indexes are derived data (:mod:`.indexes`): built in memory on the first
search that needs them, kept in sync after each of this process's commits, and dropped and rebuilt
when the file's commit counter shows another process committed. Large ones are also written to
``<store>/indexes/``, tagged with the commit counter and item count, and read back by a later open
at the same commit instead of being rebuilt; a stale or unreadable one, or one whose record does
not match this store's items and its own file, is simply rebuilt.

Opening checks the file (:mod:`.schema`) and writes nothing. Every error is one line:
bad input, unknown ids or versions and refused searches raise :class:`GalleryError`; a missing,
corrupt, older- or newer-format store raises :class:`~bctkit.errors.FileFormatError`. A call that
raises writes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from bctkit.errors import FileFormatError
from bctkit.gallery.backends.sqlite.indexes import IndexSet, factory_is_valid
from bctkit.gallery.backends.sqlite.reads import FullReads
from bctkit.gallery.backends.sqlite.schema import (
    DB_NAME,
    FORMAT_VERSION,
    PAGE_SIZE,
    SCHEMA,
    STORE_FORMAT,
    check_format,
    connect,
    read_versions,
)
from bctkit.gallery.backends.sqlite.search import search_items
from bctkit.gallery.backends.sqlite.segments import Pending, View, write_segments
from bctkit.gallery.backends.sqlite.transactions import Transactions
from bctkit.gallery.checks import (
    CERTIFICATE_FORMAT,
    GalleryError,
    check_certificate,
    check_declaration,
    check_ids,
    check_priors,
    check_vectors,
    few,
    find_version,
    first_line,
    metadata_json,
    reason,
    settled,
    to_json,
)
from bctkit.gallery.idmap import Hashed
from bctkit.gallery.interface import Gallery
from bctkit.gallery.search import SearchResult
from bctkit.storage import _fsync_dir

__all__ = ["CERTIFICATE_FORMAT", "FORMAT_VERSION", "GalleryError", "GalleryStore", "SearchResult"]
ORDER_KEY = "backfill_order:"  # meta key prefix: + version -> JSON list of the orders its backfills used


class GalleryStore(Transactions, FullReads, Gallery):
    """A directory holding one gallery: ids, metadata and vectors of any number of model versions.

    Any number of processes may open one store (SQLite serialises their commits); one object belongs
    to the thread that opened it.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, factory: str, view: View) -> None:
        """Use :meth:`create` or :meth:`open`."""
        self.path = path
        self.index = factory
        self._db = path / DB_NAME
        self._conn: sqlite3.Connection | None = conn
        self._indexes = IndexSet(factory, path / "indexes")
        self._view = view
        self._thread = threading.get_ident()
        self._pending: list[Pending] = []
        self._pending_ids: tuple[Hashed, np.ndarray] | None = None

    # ---- opening ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, index: str = "Flat") -> GalleryStore:
        """Create an empty store in the new directory ``path`` (an existing empty one is taken);
        ``index``: the FAISS factory string of every version's index. The directory appears whole or
        not at all (it is built beside ``path`` and renamed)."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise GalleryError(f"{path}: exists and is not an empty directory; a new store needs a new one")
        if not isinstance(index, str) or not factory_is_valid(index):
            raise GalleryError(f"index {index!r}: not a FAISS index factory string "
                               "(e.g. 'Flat', 'IVF1024,Flat')")
        tmp: Path | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.creating-{os.getpid()}-{secrets.token_hex(4)}"
            tmp.mkdir()
            conn = connect(tmp / DB_NAME, "rwc")
            try:
                conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
                conn.execute("BEGIN")
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("format", STORE_FORMAT), ("format_version", str(FORMAT_VERSION)), ("index", index),
                    ("commit", "0"), ("next_key", "0")])
                conn.execute("COMMIT")
            finally:
                conn.close()
            if path.exists():
                path.rmdir()
            _fsync_dir(tmp)
            os.rename(tmp, path)
            tmp = None
            _fsync_dir(path.parent)
        except (OSError, sqlite3.Error) as exc:
            raise FileFormatError(f"{path}: could not create the store ({reason(exc)})") from None
        finally:
            if tmp is not None:  # a failed create leaves nothing behind
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> GalleryStore:
        """Open an existing store; a missing, corrupt or newer-format one is refused (nothing written)."""
        path = Path(path)
        db = path / DB_NAME
        if not db.is_file():
            raise FileFormatError(f"{path}: not a gallery store (no {DB_NAME})")
        try:
            conn = connect(db, "rw")
        except (OSError, sqlite3.Error) as exc:
            raise FileFormatError(f"{db}: cannot open the gallery store ({first_line(exc)})") from None
        view = View()

        def load(c: sqlite3.Connection) -> dict[int, int]:
            view.refresh(c, db)
            return view.counts

        try:
            factory = check_format(conn, db, load)
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, factory, view)

    @property
    def location(self) -> str:
        return str(self.path)

    def close(self) -> None:
        """Close the database and drop the in-memory indexes (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._indexes.clear()

    # ---- versions and certificates ---------------------------------------------------------------

    def add_version(self, fingerprint: str, dim: int, name: str | None = None, layout: dict | None = None
                    ) -> None:
        """Declare a model version (its fingerprint) and its embedding dimension. Declaring it again
        is a no-op; a missing name or layout is filled in; a different dim, name or layout is refused."""
        wanted = check_declaration(fingerprint, dim, name, layout)
        layout_json = to_json(layout, "layout") if layout is not None else None

        def stored(conn: sqlite3.Connection) -> bool:
            """Whether the stored declaration already says all of ``wanted``; a conflict is refused."""
            old = {v.fingerprint: v for v in read_versions(conn)}.get(fingerprint)
            return settled(fingerprint, None if old is None else old._asdict(), wanted)

        with self._read() as conn:
            if stored(conn):
                return
        with self._write("add_version") as conn:  # checked again inside: another process may have declared it
            if not stored(conn):
                conn.execute("INSERT OR IGNORE INTO versions (fingerprint, name, dim, layout) "
                             "VALUES (?, ?, ?, ?)", (fingerprint, name, int(dim), layout_json))
                conn.execute("UPDATE versions SET name=coalesce(name, ?), layout=coalesce(layout, ?) "
                             "WHERE fingerprint=?", (name, layout_json, fingerprint))

    def versions(self) -> dict[str, dict]:
        """fingerprint -> {"name", "dim", "count", "layout"}, in declaration order."""
        with self._read() as conn:
            return {v.fingerprint: {"name": v.name, "dim": v.dim, "count": v.count, "layout": v.layout}
                    for v in read_versions(conn)}

    def add_certificate(self, cert: dict) -> None:
        """Store a verified compatibility certificate (query version -> gallery version). Only a passed
        one is taken; one certificate per ordered pair (a new one replaces the pair's old one)."""
        with self._read() as conn:
            q, g, sha, body = check_certificate(read_versions(conn), cert)
        with self._write("add_certificate") as conn:
            conn.execute("DELETE FROM certificates WHERE query_vid=? AND gallery_vid=?", (q.vid, g.vid))
            conn.execute("INSERT INTO certificates (query_vid, gallery_vid, sha256, body) "
                         "VALUES (?, ?, ?, ?)", (q.vid, g.vid, sha, body))

    def certificates(self) -> list[dict]:
        """The stored certificates, in the order they were added."""
        with self._read() as conn:
            return [json.loads(r[0]) for r in conn.execute("SELECT body FROM certificates ORDER BY seq")]

    def record_backfill_order(self, version: str, order: str) -> None:
        """Note that a backfill re-embedded items with ``version`` in ``order`` (kept in first-use order)."""
        if order in self.backfill_orders().get(version, []):
            return
        with self._write("record_backfill_order") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key=?", (ORDER_KEY + version,)).fetchone()
            orders = [*json.loads(row[0]), order] if row else [order]
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         (ORDER_KEY + version, json.dumps(list(dict.fromkeys(orders)))))

    def backfill_orders(self) -> dict[str, list[str]]:
        """version -> the orders its backfills used (``gallery status --report`` reads their curves)."""
        with self._read() as conn:
            rows = conn.execute("SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?",
                                (len(ORDER_KEY), ORDER_KEY))
            return {k[len(ORDER_KEY):]: json.loads(v) for k, v in rows}

    # ---- items ------------------------------------------------------------------------------------

    def _take(self, conn: sqlite3.Connection, ids: list[str], hashed: Hashed, what: str
              ) -> tuple[np.ndarray, np.ndarray]:
        """(keys, version ids) of ``ids``, already taken off their versions' counts."""
        keys = self._view.keys_of(ids, what, hashed)
        vids = self._view.vid[keys]
        old = np.unique(vids, return_counts=True)
        conn.executemany("UPDATE versions SET count = count - ? WHERE vid=?",
                         [(int(c), int(u)) for u, c in zip(*old, strict=True)])
        return keys, vids

    def add(self, ids: Sequence[str], vectors: np.ndarray, version: str,
            metadata: Sequence[dict] | None = None) -> None:
        """Add new items embedded by ``version`` (float32 [n, its dim]) in one atomic commit; an id
        already in the store is refused (the first few are named)."""
        ids, hashed = check_ids(ids, "add")
        with self._read() as conn:
            v = find_version(read_versions(conn), version, "add")
        vec = check_vectors(vectors, len(ids), v, "add")
        metas = metadata_json(metadata, len(ids))
        if not ids:
            return
        with self._write("add") as conn:
            found = self._view.lookup(ids, hashed) >= 0
            if found.any():
                taken = [i for i, f in zip(ids, found.tolist(), strict=True) if f]
                raise GalleryError(f"add: id(s) already in the store: {few(taken)}")
            first = int(conn.execute("SELECT value FROM meta WHERE key='next_key'").fetchone()[0])
            keys = np.arange(first, first + len(ids), dtype=np.int64)
            self._pending += write_segments(conn, v.vid, keys, vec, ids, hashed.lengths, metas)
            self._pending_ids = (hashed, keys)
            conn.execute("UPDATE meta SET value=? WHERE key='next_key'", (str(first + len(ids)),))
            conn.execute("UPDATE versions SET count = count + ? WHERE vid=?", (len(ids), v.vid))
        self._synced(lambda: self._indexes.add(v.vid, keys, vec))

    def replace(self, ids: Sequence[str], vectors: np.ndarray, version: str,
                priors: np.ndarray | None = None) -> None:
        """Re-embed existing items with ``version`` in one atomic commit; keys and metadata are kept.
        ``priors`` are kept in the replace's segments (their ``meta``: a JSON list of numbers)."""
        ids, hashed = check_ids(ids, "replace")
        with self._read() as conn:
            v = find_version(read_versions(conn), version, "replace")
        vec = check_vectors(vectors, len(ids), v, "replace")
        given = check_priors(priors, len(ids))
        if not ids:
            return
        with self._write("replace") as conn:
            keys, vids = self._take(conn, ids, hashed, "replace")
            texts = None if given is None else [json.dumps(float(x)) for x in given]
            self._pending += write_segments(conn, v.vid, keys, vec, metas=texts)
            conn.execute("UPDATE versions SET count = count + ? WHERE vid=?", (len(ids), v.vid))

        def update() -> None:
            for u in np.unique(vids):
                self._indexes.remove(int(u), keys[vids == u])
            self._indexes.add(v.vid, keys, vec)

        self._synced(update)

    def delete(self, ids: Sequence[str]) -> None:
        """Remove items (all must exist) in one atomic commit (a tombstone segment)."""
        ids, hashed = check_ids(ids, "delete")
        if not ids:
            return
        with self._write("delete") as conn:
            keys, vids = self._take(conn, ids, hashed, "delete")
            self._pending += write_segments(conn, None, keys, None)

        def update() -> None:
            for u in np.unique(vids):
                self._indexes.remove(int(u), keys[vids == u])

        self._synced(update)

    def get(self, ids: Sequence[str]) -> tuple[np.ndarray | list[np.ndarray], list[str]]:
        """(vectors, versions) of ``ids``: one float32 [n, d] array when all share a dimension, else a
        list of 1-D arrays; unknown ids are refused."""
        ids = list(ids)
        with self._read() as conn:
            keys = self._view.keys_of(ids, "get")
            vers = {x.vid: x for x in read_versions(conn)}
            vids = self._view.vid[keys]
            dims = np.array([vers[u].dim for u in vids.tolist()], dtype=np.int64)
            versions = [vers[u].fingerprint for u in vids.tolist()]
            if not len(keys):
                return np.zeros((0, 0), np.float32), versions
            if (dims == dims[0]).all():
                return self._view.vectors(conn, keys, int(dims[0]), self._db), versions
            out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(keys)
            for d in np.unique(dims).tolist():
                where = np.flatnonzero(dims == d)
                for w, row in zip(where.tolist(), self._view.vectors(conn, keys[where], d, self._db),
                                  strict=True):
                    out[w] = row
            return out, versions

    def find(self, ids: Sequence[str]) -> list[str | None]:
        """The version of each of ``ids``, None for an id no item has (unknown ids are not refused)."""
        ids, hashed = check_ids(ids, "find")
        with self._read() as conn:
            keys = self._view.lookup(ids, hashed)
            fps = {x.vid: x.fingerprint for x in read_versions(conn)}
            vids = np.full(len(keys), -1, np.int64)
            vids[keys >= 0] = self._view.vid[keys[keys >= 0]]
            return [fps[u] if u >= 0 else None for u in vids.tolist()]

    def metadata(self, ids: Sequence[str]) -> list[dict]:
        """The metadata dict of each id ({} when none was given)."""
        ids = list(ids)
        with self._read() as conn:
            return self._view.metadata(conn, self._view.keys_of(ids, "metadata"))

    def count(self, version: str | None = None) -> int:
        """Number of items, of one version or of all."""
        with self._read() as conn:
            if version is None:
                return int(conn.execute("SELECT coalesce(sum(count), 0) FROM versions").fetchone()[0])
            return find_version(read_versions(conn), version, "count").count

    def ids(self, version: str | None = None) -> list[str]:
        """The ids, of one version or of all, in insertion order."""
        with self._read() as conn:
            vid = None if version is None else find_version(read_versions(conn), version, "ids").vid
            return self._view.ids_of(self._view.live(vid))

    @contextlib.contextmanager
    def backfill_lock(self) -> Iterator[None]:
        """An exclusive flock on the store's folder while a backfill runs; a second one is refused at
        once. The kernel drops it when its process dies, so a SIGKILLed backfill leaves nothing stuck."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise GalleryError(f"{self.path}: another backfill is running on this store; wait for it "
                                   "to end (or stop it: a killed backfill releases the store)") from None
            yield
        finally:
            os.close(fd)

    # ---- search -----------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, version: str, k: int) -> SearchResult:
        """Top-k items for queries embedded by ``version``, over every version's items: the same
        version on all coordinates, another one only through a stored passed certificate (query
        ``version`` -> gallery that version) on its dims; cosine scores, ties to the earlier item."""
        with self._read() as conn:
            return search_items(conn, self._indexes, self._view, version, queries, k, self._db)
