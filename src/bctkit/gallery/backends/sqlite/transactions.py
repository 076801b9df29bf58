"""The gallery store's transactions: SQLite errors as one-line errors, read snapshots that bring the
in-memory view up to date, and atomic write transactions whose segments join the view once
committed (:class:`bctkit.gallery.backends.sqlite.store.GalleryStore` inherits them).

Every write transaction reports three events through :func:`event` (a no-op unless the
environment variable :data:`..events.EVENTS_ENV` names a file): ``begin`` (the write lock is held),
``written`` (every row is written, nothing committed) and ``committed``. Crash tests stop a
process at one of them (:data:`..events.STOP_ENV`) and SIGKILL it there: the kill lands at a defined point
of the transaction however loaded the machine is, where a kill timed by a clock may land anywhere.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bctkit.errors import FileFormatError
from bctkit.gallery.backends.sqlite.indexes import IndexSet
from bctkit.gallery.backends.sqlite.segments import Pending, View
from bctkit.gallery.checks import GalleryError, first_line
from bctkit.gallery.events import event
from bctkit.gallery.idmap import Hashed


class Helper:
    """A function run on a helper thread; :meth:`join` waits for it and returns its exception."""

    def __init__(self, fn: Any) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="gallery-helper")
        self._thread.start()

    def _run(self, fn: Any) -> None:
        try:
            fn()
        except BaseException as exc:
            self._error = exc

    def join(self) -> BaseException | None:
        """Wait for the function; its exception, if it raised one."""
        self._thread.join()
        return self._error


class Transactions:
    """Transactions over ``_conn`` (owned by the thread ``_thread``) keeping ``_view`` and
    ``_indexes`` in step with the file. A write's body lists the segments it wrote in ``_pending``
    and an add's (id hashes, keys) in ``_pending_ids``."""

    path: Path
    _db: Path
    _conn: sqlite3.Connection | None
    _thread: int
    _view: View
    _indexes: IndexSet
    _pending: list[Pending]
    _pending_ids: tuple[Hashed, np.ndarray] | None

    @property
    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            raise GalleryError(f"{self.path}: the store is closed")
        if threading.get_ident() != self._thread:
            raise GalleryError(f"{self._db}: this store object belongs to the thread that opened it; "
                               "open the store again in this thread")
        return self._conn

    @contextmanager
    def _sql(self) -> Iterator[None]:
        """SQLite errors as one-line errors naming the store."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise GalleryError(f"{self._db}: the store is locked by another writer ({exc})") from None
            raise FileFormatError(f"{self._db}: {first_line(exc)}") from None
        except sqlite3.ProgrammingError as exc:
            raise GalleryError(f"{self._db}: {first_line(exc)}") from None
        except sqlite3.Error as exc:
            msg = f"{self._db}: corrupt or unreadable gallery store ({first_line(exc)})"
            raise FileFormatError(msg) from None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction (one consistent snapshot), the view brought up to date with it."""
        conn = self._c
        with self._sql():
            conn.execute("BEGIN")
            try:
                self._view.refresh(conn, self._db)
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    @contextmanager
    def _write(self, call: str) -> Iterator[sqlite3.Connection]:
        """One atomic write transaction of method ``call`` that bumps the commit counter; rolled
        back on any error.
        The view is brought up to date under the write lock (``BEGIN IMMEDIATE``) first, so the
        body sees every other process's commits; the segments it lists in ``_pending`` join the
        view with the commit. After the commit the in-memory indexes either follow (see
        :meth:`_synced`) or are dropped."""
        conn = self._c
        self._pending, self._pending_ids = [], None
        with self._sql():
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._view.refresh(conn, self._db)
                before = int(conn.execute("SELECT value FROM meta WHERE key='commit'").fetchone()[0])
                in_sync = before == self._indexes.commit
                event(call, "begin")
                yield conn
                conn.execute("UPDATE meta SET value=? WHERE key='commit'", (str(before + 1),))
                event(call, "written")
                self._commit(conn, before + 1)
            except BaseException:
                self._pending, self._pending_ids = [], None
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        self._indexes.commit = before + 1 if in_sync else -1
        if not in_sync:
            self._indexes.clear()
        event(call, "committed")

    def _commit(self, conn: sqlite3.Connection, commit: int) -> None:
        """COMMIT on a helper thread while this one applies the pending segments to the view (the
        commit mostly waits for the disk). When the commit fails, or the view could not follow,
        the view is dropped (the next call rebuilds it from the file); the commit's error is
        raised."""
        helper = Helper(lambda: conn.execute("COMMIT"))
        applied = False
        try:
            for seg, vid, keys, ids in self._pending:
                self._view.apply(seg, vid, keys, ids, self._db)
            if self._pending_ids is not None:
                self._view.idmap.add(*self._pending_ids)
            self._view.commit = commit
            applied = True
        except Exception:
            applied = False  # the view is rebuilt from the file instead
        finally:
            failed = helper.join()
            self._pending, self._pending_ids = [], None
            if failed is not None or not applied:
                self._view = View()
        if failed is not None:
            raise failed

    def _synced(self, update: Any) -> None:
        """Apply an in-memory index update after a commit; on any failure drop the indexes instead."""
        if self._indexes.commit < 0:
            return
        try:
            update()
        except Exception:
            self._indexes.clear()
