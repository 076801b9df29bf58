"""Mixed-version search of a gallery store: which versions may be compared (a stored passed
certificate per ordered pair of versions), the index blocks each query version searches, and the
merge of their rule-exact top-k lists into one ranking (see :mod:`bctkit.gallery.indexes`)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

import numpy as np

from bctkit.gallery.checks import (
    GalleryError,
    Version,
    check_vectors,
    find_version,
    first_line,
    read_versions,
)
from bctkit.gallery.indexes import NO_KEY, Block, IndexSet, merge, normalize_rows
from bctkit.gallery.segments import View


class SearchResult(NamedTuple):
    """Per query: the ids found, best first, their cosine scores [Q, k] float32 and their versions.

    Every row has min(k, items searched) places; a place an approximate index left empty has id "",
    version "" and score -inf.
    """

    ids: list[list[str]]
    scores: np.ndarray
    versions: list[list[str]]


def search_items(conn: sqlite3.Connection, indexes: IndexSet, view: View, version: str, queries: Any, k: Any,
                 db: Any = "gallery store") -> SearchResult:
    """Top-k of the store ``db`` behind ``conn`` (inside one read transaction, ``view`` up to date
    with it) for ``version`` queries."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise GalleryError(f"search: k must be a positive integer, got {k!r}")
    v = find_version(conn, version, "search")
    q = check_vectors(queries, None, v, "search: queries")
    plan = _plan(conn, v)
    _ensure(conn, indexes, view, [blk for blk, _ in plan], db)
    parts = []
    for blk, (qa, qb) in plan:
        try:
            s, keys = indexes.search(blk, normalize_rows(q[:, qa:qb]), int(k))
        except RuntimeError as exc:
            raise GalleryError(f"search: FAISS failed ({first_line(exc)})") from None
        parts.append((s, keys, blk[0]))
    scores, keys, vids = merge(parts, len(q), int(k))
    names = {c: view.name(c) for c in np.unique(keys[keys != NO_KEY]).tolist()}
    fps = {x.vid: x.fingerprint for x in read_versions(conn)}
    ids = [[names.get(int(c), "") for c in row] for row in keys]
    vers = [[fps.get(int(u), "") if names.get(int(c)) else "" for c, u in zip(kr, ur, strict=True)]
            for kr, ur in zip(keys, vids, strict=True)]
    return SearchResult(ids, scores, vers)


def search_blocker(store: Any, fingerprint: str) -> Version | None:
    """The first version holding items of ``store`` that queries of version ``fingerprint`` (declared
    or not) may not search, or None; from the declared versions and stored certificates alone."""
    versions = [Version(i, fp, info["name"], info["dim"], info["layout"], info["count"])
                for i, (fp, info) in enumerate(store.versions().items())]
    certified = {c["gallery"]["fingerprint"] for c in store.certificates()
                 if c["query"]["fingerprint"] == fingerprint}
    return _uncertified(fingerprint, versions, certified)


def check_search_allowed(store: Any, fingerprint: str, name: str | None = None) -> None:
    """Refuse queries of version ``fingerprint`` (declared in ``store`` or not; ``name`` for the
    message) that may not search every version holding items, decided from the declared versions
    and stored certificates alone: a caller checks before it declares the version or embeds a query."""
    blocked = search_blocker(store, fingerprint)
    if blocked is not None:
        raise _refused(f"{name} ({fingerprint})" if name else fingerprint, blocked)


def _uncertified(fingerprint: str, versions: Sequence[Version], certified: Collection[str]
                 ) -> Version | None:
    """The first version holding items that ``fingerprint`` queries may not search: neither their
    own version nor one a stored passed certificate (query -> it) allows."""
    return next((u for u in versions
                 if u.count and u.fingerprint != fingerprint and u.fingerprint not in certified), None)


def _refused(label: str, u: Version) -> GalleryError:
    return GalleryError(f"search: {label} queries cannot search the {u.count} items of {u.label}: "
                        "a passed compatibility certificate for this pair is needed "
                        "(bctkit gallery certify) or those items must be backfilled")


def _plan(conn: sqlite3.Connection, v: Version) -> list[tuple[Block, tuple[int, int]]]:
    """(index block, query coordinates) for every version with items; refused without a certificate."""
    certs = {r[0]: json.loads(r[1]) for r in conn.execute(
        "SELECT gallery_vid, body FROM certificates WHERE query_vid=?", (v.vid,))}
    versions = read_versions(conn)
    blocked = _uncertified(v.fingerprint, versions, {u.fingerprint for u in versions if u.vid in certs})
    if blocked is not None:
        raise _refused(v.label, blocked)
    plan = []
    for u in versions:
        if u.count == 0:
            continue
        if u.vid == v.vid:
            plan.append(((u.vid, 0, u.dim), (0, v.dim)))
            continue
        (qa, qb), (ga, gb) = certs[u.vid]["query_dims"], certs[u.vid]["gallery_dims"]
        plan.append(((u.vid, int(ga), int(gb)), (int(qa), int(qb))))
    return plan


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
