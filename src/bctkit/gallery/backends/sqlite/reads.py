"""The SQLite store's passes over every item: the scan a backfill plans from, and the check that
reads every vector (``gallery status``). Both read inside one snapshot, in bounded memory."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from bctkit.errors import FileFormatError
from bctkit.gallery.backends.sqlite.schema import read_versions
from bctkit.gallery.backends.sqlite.segments import damaged
from bctkit.gallery.checks import few


class FullReads:
    """Mixed into the SQLite ``GalleryStore``: uses its snapshot reads (``_read``) and item view."""

    _view: Any
    _db: Any
    _read: Any

    def scan(self, step: int = 65536, norms: bool = True
             ) -> Iterator[tuple[list[str], list[str], np.ndarray, np.ndarray]]:
        """Every item in insertion order, in parts: (ids, versions, vector norms, priors): the priors
        a replace was given (kept in its segment), else -1 (this store records no norms as priors:
        its backfill writes its batches in plan order, one commit each)."""
        with self._read() as conn:
            vers = {v.vid: v for v in read_versions(conn)}
            keys = self._view.live()
            for s in range(0, len(keys), step):
                part = keys[s : s + step]
                vids = self._view.vid[part]
                size = np.zeros(len(part), np.float64)
                for u in np.unique(vids).tolist() if norms else []:
                    where = np.flatnonzero(vids == u)
                    vec = self._view.raw_vectors(conn, part[where], vers[u].dim).astype(np.float64)
                    size[where] = np.sqrt(np.einsum("ij,ij->i", vec, vec))
                yield (self._view.ids_of(part), [vers[u].fingerprint for u in vids.tolist()], size,
                       self._view.priors(conn, part))

    def verify(self) -> None:
        """Read every item's vector and refuse the store, naming the damaged items, when one holds
        NaN or Inf (bytes changed on disk: SQLite keeps no checksums and an open reads no vectors).
        Reads the store once, in bounded memory; writes nothing."""
        step = 1 << 16
        bad: list[str] = []
        with self._read() as conn:
            for v in read_versions(conn):
                keys = self._view.live(v.vid)
                for s in range(0, len(keys), step):
                    part = keys[s : s + step]
                    bad += self._view.ids_of(part[damaged(self._view.raw_vectors(conn, part, v.dim))])
        if bad:
            raise FileFormatError(f"{self._db}: corrupt gallery store ({len(bad)} damaged item(s): vectors "
                                  f"holding NaN or Inf: {few(bad)})")
