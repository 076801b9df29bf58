"""Mixed-version search of a Milvus gallery under the ranking rule.

A block that compares a version's whole vector (its own queries, or a certificate over all of the
gallery version's dims) is one filtered COSINE search in Milvus: the query's compared coordinates
are normalised and zero-padded like the stored vectors, so the score is the cosine over exactly those
coordinates. Milvus orders ties arbitrarily and may cut a tie at the k-th place, so each block is
searched one place past k, and rows whose k-th score ties the last one returned are searched again
with a doubled depth until the tie is resolved or the block is exhausted; the places then sort by
(score, insertion key). The places' scores are computed again here from the vectors returned, as a
scanned block computes them (:func:`cosines`): Milvus's kernel rounds differently, and items of two
blocks whose compared vectors are equal up to scale must score exactly alike for the tie to go to
the earlier insertion. A block over part of the gallery version's dims (a certificate's
``gallery_dims`` short of its whole vector: the cosine of a sub-vector, which no stored index holds)
is computed by reading that version's vectors in parts and keeping a running top-k: exact, and one
read of the version per search.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from bctkit.gallery.backends.milvus.client import call, iterate, padded
from bctkit.gallery.checks import Version, check_vectors, find_version
from bctkit.gallery.ranking import NO_KEY, merge, normalize_rows
from bctkit.gallery.search import SearchResult, check_k, plan_blocks

if TYPE_CHECKING:
    from bctkit.gallery.backends.milvus.store import MilvusGallery

MAX_DEPTH = 16384
"""Milvus's largest top-k per search."""
QUERIES = 1024
"""Queries per search request."""
UNCOUNTED = 1 << 62
"""The count of a version searched without counting its items first (FLAT index: an exact search
that returns fewer places than asked has returned them all)."""
READ_BYTES = 8 << 20
"""About this many vector bytes per read of the places' vectors."""


def search_items(g: MilvusGallery, queries: Any, version: str, k: Any) -> SearchResult:
    """Top-k of gallery ``g`` for ``version`` queries (see the module docstring)."""
    k = check_k(k)
    versions = g._versions(counted=False)
    v = find_version(versions, version, "search")
    q = check_vectors(queries, None, v, "search: queries")
    certs = {r["gallery_vid"]: r["body"] for r in g._certs() if r["query_vid"] == v.vid}
    if g.dim is not None and g._fmt.get("index") in ("Flat", "FLAT") and len(q):
        versions = [u._replace(count=UNCOUNTED) if u.vid == v.vid or u.vid in certs else _counted(g, u)
                    for u in versions]
    else:
        versions = g._versions()
    plan = plan_blocks(v, versions, certs)
    by_vid = {u.vid: u for u in versions}
    names: dict[int, str] = {}
    parts = []
    for (vid, ga, gb), (qa, qb) in plan:
        u = by_vid[vid]
        qn = normalize_rows(q[:, qa:qb])
        if ga == 0 and gb == u.dim:
            s, keys = _indexed(g, u, padded(qn, int(g.dim)), k, names)
        else:
            s, keys = _scanned(g, u, ga, gb, qn, k, names)
        parts.append((s, keys, vid))
    scores, keys, vids = merge(parts, len(q), k)
    fps = {u.vid: u.fingerprint for u in versions}
    ids = [[names.get(int(c), "") for c in row] for row in keys]
    vers = [[fps[int(u)] if names.get(int(c)) else "" for c, u in zip(kr, ur, strict=True)]
            for kr, ur in zip(keys, vids, strict=True)]
    return SearchResult(ids, scores, vers)


def _counted(g: MilvusGallery, u: Version) -> Version:
    """``u`` with its count when it holds items (one item read first: a filtered count scans them
    all), 0 when it holds none."""
    rows = call(f"{g.location}: read", g._c.query, g._items, filter=f"version == {json.dumps(u.fingerprint)}",
                output_fields=["id"], limit=1) if g.dim is not None else []
    return u._replace(count=g._count(u.fingerprint) if rows else 0)


def _milvus_search(g: MilvusGallery, u: Version, q: np.ndarray, depth: int, names: dict[int, str]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, keys) [len(q), depth] of one filtered search, sorted by the rule, empty places padded;
    the scores computed again from the places' vectors (:func:`cosines`), each read once."""
    keys = np.full((len(q), depth), NO_KEY, np.int64)
    found: dict[int, str] = {}
    for s in range(0, len(q), QUERIES):
        res = call(f"{g.location}: search", g._c.search, g._items, data=list(q[s:s + QUERIES]), limit=depth,
                   filter=f"version == {json.dumps(u.fingerprint)}", output_fields=["seq"],
                   search_params={"metric_type": "COSINE"})
        for r, hits in enumerate(res):
            for c, h in enumerate(hits):
                keys[s + r, c] = int(h["entity"]["seq"])
                found[int(h["entity"]["seq"])] = h["id"]
    names.update(found)
    scores = np.full((len(q), depth), -np.inf, np.float32)
    if found:
        seqs = np.fromiter(found, np.int64, len(found))
        unit = normalize_rows(_vectors(g, list(found.values()), u.dim)).astype(np.float64)
        by_seq = np.argsort(seqs)
        for r in range(len(q)):
            n = int((keys[r] != NO_KEY).sum())
            at = by_seq[np.searchsorted(seqs[by_seq], keys[r, :n])]
            scores[r, :n] = (unit[at] @ q[r, : u.dim].astype(np.float64)).astype(np.float32)
    order = np.lexsort((keys, -scores.astype(np.float64)), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(keys, order, 1)


def _vectors(g: MilvusGallery, ids: list[str], dim: int) -> np.ndarray:
    """The stored vectors of ``ids`` (all stored), their first ``dim`` coordinates, [len(ids), dim]."""
    out = np.zeros((len(ids), dim), np.float32)
    at = {i: r for r, i in enumerate(ids)}
    step = max(1, READ_BYTES // (4 * int(g.dim or 1)))
    for s in range(0, len(ids), step):
        rows = call(f"{g.location}: read", g._c.get, g._items, ids=ids[s:s + step],
                    output_fields=["id", "vec"])
        for e in rows:
            out[at[e["id"]]] = np.asarray(e["vec"][:dim], dtype=np.float32)
    return out


def _indexed(g: MilvusGallery, u: Version, q: np.ndarray, k: int, names: dict[int, str]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Rule-exact top-k of version ``u``'s items through Milvus's index (see the module docstring)."""
    k = min(k, u.count)
    if k >= MAX_DEPTH:  # a Milvus server refuses a limit past MAX_DEPTH: the block is read exactly
        return _scanned(g, u, 0, u.dim, q[:, : u.dim], k, names)
    depth = min(k + 1, u.count)
    scores, keys = _milvus_search(g, u, q, depth, names)
    if u.count == UNCOUNTED:  # an exact search that returns fewer places than asked returned every item
        found = int((keys != NO_KEY).sum(axis=1).max())
        if found < depth:
            u, k = u._replace(count=found), min(k, found)
    rows = np.arange(len(q))
    while depth < u.count and k:
        tied = rows[scores[rows, depth - 1] == scores[rows, k - 1]]
        if not len(tied):
            break
        if depth >= MAX_DEPTH:  # beyond Milvus's top-k: the tied rows are read exactly
            s2, k2 = _scanned(g, u, 0, u.dim, q[tied][:, : u.dim], k, names)
            scores[tied, :k], keys[tied, :k] = s2, k2
            break
        depth = min(2 * depth, u.count, MAX_DEPTH)
        s2, k2 = _milvus_search(g, u, q[tied], depth, names)
        grown_s = np.full((len(q), depth), -np.inf, np.float32)
        grown_k = np.full((len(q), depth), NO_KEY, np.int64)
        grown_s[:, : scores.shape[1]], grown_k[:, : keys.shape[1]] = scores, keys
        grown_s[tied], grown_k[tied] = s2, k2
        scores, keys, rows = grown_s, grown_k, tied
    return scores[:, :k], keys[:, :k]


def _scanned(g: MilvusGallery, u: Version, ga: int, gb: int, q: np.ndarray, k: int, names: dict[int, str]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of version ``u``'s items on their dims [ga, gb) for normalised queries ``q``."""
    best = (np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64), u.vid)
    for part in iterate(g._c, g._items, ["id", "seq", "vec"], g.location,
                        f"version == {json.dumps(u.fingerprint)}"):
        vec = np.asarray([e["vec"][ga:gb] for e in part], dtype=np.float32)
        seq = np.asarray([e["seq"] for e in part], np.int64)
        names.update((int(s), e["id"]) for s, e in zip(seq, part, strict=True))
        scores = cosines(q, vec)
        top = min(k, len(seq))
        cut = np.argpartition(-scores, top - 1, axis=1)[:, :top] if top < len(seq) else None
        if cut is not None:  # keep every place tied with the k-th score: the merge breaks ties by key
            kth = np.take_along_axis(scores, cut, 1).min(axis=1, keepdims=True)
            keep = scores >= kth
            width = int(keep.sum(axis=1).max())
            order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
            s = np.take_along_axis(np.where(keep, scores, -np.inf), order, 1)
            kk = np.where(np.isfinite(s), seq[order], NO_KEY)
        else:
            s, kk = scores, np.broadcast_to(seq, scores.shape)
        s_, k_, _ = merge([best, (s.astype(np.float32), kk, u.vid)], len(q), k)
        best = (s_, k_, u.vid)
    return best[0], best[1]


def cosines(q: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """float32 cosines [len(q), len(vec)] of unit queries ``q`` with the rows of ``vec`` (normalised
    here), summed in float64 and rounded once: rows equal up to a power-of-two scale score alike
    (float64 sums in another order differ by about 1e-16, far below float32's rounding step),
    whichever path (an index's candidates or a scan) and whatever batch read them."""
    return (q.astype(np.float64) @ normalize_rows(vec).astype(np.float64).T).astype(np.float32)
