"""The gallery store's file: its SQLite schema, connections, and the checks an open makes.

Opening checks the format version (a newer one is refused), the file's length against its header,
SQLite's ``quick_check`` (page structure; SQLite keeps no checksums, so bytes flipped inside a vector
go unnoticed) and the live items of every version (read from the segments) against its stored count,
and writes nothing. A store of format 1 (one row per item) is refused with a one-line error. The
length check runs inside the open's read transaction: under SQLite's shared lock no commit of
another process is writing the file, and a hot journal left by a crash has already been rolled back.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

from bctkit.errors import FileFormatError
from bctkit.gallery.checks import Version, first_line

DB_NAME = "gallery.sqlite"
STORE_FORMAT = "bctkit-gallery"
FORMAT_VERSION = 2
PAGE_SIZE = 65536
"""SQLite page size of a new store: vectors are written as overflow pages, and large pages write
them at about the disk's speed (4096-byte pages: about 1.4x slower here)."""
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE versions (vid INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE, name TEXT,
                       dim INTEGER NOT NULL, layout TEXT, count INTEGER NOT NULL DEFAULT 0);
CREATE TABLE segments (seg INTEGER PRIMARY KEY, vid INTEGER, n INTEGER NOT NULL, first_key INTEGER,
                       keys BLOB, ids BLOB, id_offsets BLOB, meta TEXT, vec BLOB);
CREATE TABLE certificates (seq INTEGER PRIMARY KEY, query_vid INTEGER NOT NULL,
                           gallery_vid INTEGER NOT NULL, sha256 TEXT NOT NULL, body TEXT NOT NULL,
                           UNIQUE (query_vid, gallery_vid));
"""



def truncated(conn: sqlite3.Connection, db: Path) -> bool:
    """Whether the database states more pages than the file holds (a truncated copy). Asked of
    SQLite and ``os.stat``: opening the file here would drop this process's SQLite locks on it
    (POSIX record locks belong to the process and die with any descriptor of the file closing)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return pages * size > db.stat().st_size


def connect(db: Path, mode: str) -> sqlite3.Connection:
    """A connection to ``db`` (URI ``mode``: rw or rwc) with durable commits. It may run a commit
    on a helper thread (the store checks itself that only its opener's thread calls it)."""
    conn = sqlite3.connect(f"file:{db}?mode={mode}", uri=True, isolation_level=None, timeout=60.0,
                           check_same_thread=False)
    conn.execute("PRAGMA synchronous=FULL")
    # A small page cache: a large add's pages spill to the file (after the journal is synced, so
    # still atomic) instead of piling up in memory; measured faster than 256 MiB (0.44 s against
    # 0.57 s for 1M x 128 in 100k-item commits). Reads go through the OS page cache anyway.
    conn.execute("PRAGMA cache_size=-8192")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn



def check_format(conn: sqlite3.Connection, db: Path, load: Callable[[sqlite3.Connection], dict[int, int]]
                 ) -> str:
    """The store's factory string after checking its format, version, structure (SQLite's
    quick_check: about 1 s per GB) and item counts; ``load`` reads the segments inside the same
    read transaction and returns the live items per version id."""
    try:
        conn.execute("BEGIN")
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if truncated(conn, db):  # under the shared lock: no commit is writing the file now
                raise FileFormatError(f"{db}: corrupt gallery store (the file is truncated)")
            if "meta" not in tables:
                raise FileFormatError(f"{db}: not a bctkit gallery store (tables missing)")
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            if meta.get("format") != STORE_FORMAT:
                raise FileFormatError(f"{db}: not a bctkit gallery store (format {meta.get('format')!r})")
            try:
                fv = int(meta.get("format_version", ""))
            except ValueError:
                raise FileFormatError(f"{db}: corrupt gallery store (format version "
                                      f"{meta.get('format_version')!r})") from None
            if fv > FORMAT_VERSION:
                raise FileFormatError(f"{db}: written by a newer bctkit (store format {fv}; this bctkit "
                                      f"reads up to {FORMAT_VERSION}); upgrade bctkit to open it")
            if fv < FORMAT_VERSION:
                raise FileFormatError(f"{db}: written by an older bctkit store format {fv}; this bctkit "
                                      f"reads store format {FORMAT_VERSION} only (create a new store and add "
                                      "the items again)")
            if not {"versions", "segments", "certificates"} <= tables:
                raise FileFormatError(f"{db}: not a bctkit gallery store (tables missing)")
            problems = [r[0] for r in conn.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                lines = [ln.strip(" *") for p in problems for ln in str(p).splitlines() if ln.strip(" *")]
                raise FileFormatError(f"{db}: corrupt gallery store ({'; '.join(lines)[:300]})")
            live = load(conn)
            counted = dict(conn.execute("SELECT vid, count FROM versions"))
            for vid in sorted(set(live) | set(counted)):
                if live.get(vid, 0) != counted.get(vid, 0):
                    raise FileFormatError(f"{db}: corrupt gallery store (version id {vid}: "
                                          f"{live.get(vid, 0)} items, its count says {counted.get(vid, 0)})")
            return str(meta["index"])
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise FileFormatError(f"{db}: corrupt gallery store ({first_line(exc)})") from None


def read_versions(conn: sqlite3.Connection) -> list[Version]:
    """The declared versions, in declaration order."""
    rows = conn.execute("SELECT vid, fingerprint, name, dim, layout, count FROM versions ORDER BY vid")
    return [Version(r[0], r[1], r[2], r[3], json.loads(r[4]) if r[4] else None, r[5]) for r in rows]
