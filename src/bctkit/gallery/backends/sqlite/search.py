"""Mixed-version search of the SQLite store: its FAISS index blocks (:mod:`.indexes`), built or read
from the index cache, searched under the ranking rule and merged into one ranking."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import numpy as np

from bctkit.gallery.backends.sqlite.indexes import IndexSet
from bctkit.gallery.backends.sqlite.schema import read_versions
from bctkit.gallery.backends.sqlite.segments import View
from bctkit.gallery.checks import GalleryError, check_vectors, find_version, first_line
from bctkit.gallery.ranking import NO_KEY, merge, normalize_rows
from bctkit.gallery.search import Block, SearchResult, check_k, plan_blocks


def search_items(conn: sqlite3.Connection, indexes: IndexSet, view: View, version: str, queries: Any, k: Any,
                 db: Any = "gallery store") -> SearchResult:
    """Top-k of the store ``db`` behind ``conn`` (inside one read transaction, ``view`` up to date
    with it) for ``version`` queries."""
    k = check_k(k)
    versions = read_versions(conn)
    v = find_version(versions, version, "search")
    q = check_vectors(queries, None, v, "search: queries")
    certs = {r[0]: json.loads(r[1]) for r in conn.execute(
        "SELECT gallery_vid, body FROM certificates WHERE query_vid=?", (v.vid,))}
    plan = plan_blocks(v, versions, certs)
    _ensure(conn, indexes, view, [blk for blk, _ in plan], db)
    parts = []
    for blk, (qa, qb) in plan:
        try:
            s, keys = indexes.search(blk, normalize_rows(q[:, qa:qb]), k)
        except RuntimeError as exc:
            raise GalleryError(f"search: FAISS failed ({first_line(exc)})") from None
        parts.append((s, keys, blk[0]))
    scores, keys, vids = merge(parts, len(q), k)
    names = {c: view.name(c) for c in np.unique(keys[keys != NO_KEY]).tolist()}
    fps = {x.vid: x.fingerprint for x in versions}
    ids = [[names.get(int(c), "") for c in row] for row in keys]
    vers = [[fps.get(int(u), "") if names.get(int(c)) else "" for c, u in zip(kr, ur, strict=True)]
            for kr, ur in zip(keys, vids, strict=True)]
    return SearchResult(ids, scores, vers)


def _ensure(conn: sqlite3.Connection, indexes: IndexSet, view: View, blocks: list[Block], db: Any) -> None:
    """Build the missing indexes of ``blocks`` from the live items (all of them when stale), or read
    them from the cache when a file there was built from this store's items (:meth:`View.digest`)."""
    commit = int(conn.execute("SELECT value FROM meta WHERE key='commit'").fetchone()[0])
    if commit != indexes.commit:
        indexes.clear()
        indexes.commit = commit
    versions = {x.vid: x for x in read_versions(conn)}
    source: list[str] = []

    def digest() -> str:  # computed once, and only when a cache file is read or written
        if not source:
            source.append(view.digest(conn))
        return source[0]

    missing = [b for b in blocks if b not in indexes.indexes
               and not indexes.load(b, versions[b[0]].count, digest)]
    for u in sorted({b[0] for b in missing}):
        keys = view.live(u)
        vec = view.vectors(conn, keys, versions[u].dim, db)
        for blk in (b for b in missing if b[0] == u):
            try:
                indexes.build(blk, keys, vec)
            except RuntimeError as exc:
                msg = f"search: cannot build the {indexes.factory!r} index ({first_line(exc)})"
                raise GalleryError(msg) from None
            indexes.save(blk, digest)
