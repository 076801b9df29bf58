"""Mixed-version search of a gallery store: which versions may be compared (certificates), the FAISS
indexes derived from the store's items, and top-k under the tie rule. Also the checks of the vectors
and ids that the store and its search take, and :class:`GalleryError`.

One index per (version, compared block): the block is all of a version's coordinates for queries of
the same version, or a certificate's ``gallery_dims`` for queries of another version. Every index is
an ``IndexIDMap2`` over the store's factory string (exact ``Flat`` by default) holding the item's
int64 key and its L2-normalised block, so inner product is cosine. The indexes are derived data:
the store (SQLite) is the truth, and a stale index set is simply dropped and rebuilt.

Ranking rule (the project's, see :mod:`bctkit.evaluation.search`): decreasing score, and among equal
scores the lower key (the earlier insertion) first. FAISS leaves the order of ties unspecified and may
cut a tie at the k-th place arbitrarily, so each index is searched one place past k and, in rows where
the k-th score is tied with the last one returned, again with a doubled depth until the tie is
resolved or the index is exhausted; the per-index lists then merge by (score, key).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from bctkit.errors import BctkitError

NO_KEY = np.iinfo(np.int64).max
"""Key of an empty result place (an approximate index found fewer than k items)."""

Block = tuple[int, int, int]
"""(version id, first coordinate, end coordinate) of an index."""
CERTIFICATE_FORMAT = "bctkit-compatibility-certificate"
CACHE_MIN_ITEMS = 20_000
"""Indexes with fewer items are rebuilt on open rather than written to the store's index cache."""
_FETCH = 65536


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


def read_versions(conn: sqlite3.Connection) -> list[Version]:
    """The declared versions, in declaration order."""
    rows = conn.execute("SELECT vid, fingerprint, name, dim, layout, count FROM versions ORDER BY vid")
    return [Version(r[0], r[1], r[2], r[3], json.loads(r[4]) if r[4] else None, r[5]) for r in rows]


def find_version(conn: sqlite3.Connection, fingerprint: Any, what: str) -> Version:
    """The version ``fingerprint``; an unknown one is refused."""
    for v in read_versions(conn):
        if v.fingerprint == fingerprint:
            return v
    raise GalleryError(f"{what}: unknown version {fingerprint!r}; declare it with add_version first")


def few(items: Sequence[Any], n: int = 3) -> str:
    """The first few of ``items`` for an error message, with the total when there are more."""
    head = ", ".join(repr(x) for x in items[:n])
    return head + (f" (and {len(items) - n} more)" if len(items) > n else "")


def check_ids(ids: Sequence[str], what: str) -> list[str]:
    """``ids`` as a list of non-empty strings without duplicates."""
    if isinstance(ids, str | bytes):
        raise GalleryError(f"{what}: ids must be a sequence of strings, got a single {type(ids).__name__}")
    out = list(ids)
    bad = [i for i in out if not isinstance(i, str) or not i]
    if bad:
        raise GalleryError(f"{what}: ids must be non-empty strings, got {few(bad)}")
    if len(set(out)) != len(out):
        seen: set[str] = set()
        dup = [i for i in out if i in seen or seen.add(i)]
        raise GalleryError(f"{what}: duplicate ids within one call: {few(list(dict.fromkeys(dup)))}")
    return out


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
    step = max(1, (1 << 22) // v.dim)
    for s in range(0, n, step):
        finite = np.isfinite(arr[s : s + step]).all(axis=1)
        if not finite.all():
            raise GalleryError(f"{what}: vector {s + int(np.argmin(finite))} contains NaN or Inf")
    return arr


def to_json(obj: Any, what: str) -> str:
    """Compact strict JSON of ``obj``; refused when it is not serialisable (NaN included)."""
    try:
        return json.dumps(obj, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise GalleryError(f"{what}: not JSON serialisable ({exc})") from None


def check_certificate(conn: sqlite3.Connection, cert: Any) -> tuple[Version, Version, str, str]:
    """(query version, gallery version, sha256, JSON body) of a passed certificate whose versions are
    declared with its dims; anything else is refused."""
    if not isinstance(cert, dict) or cert.get("format") != CERTIFICATE_FORMAT:
        raise GalleryError(f"add_certificate: not a {CERTIFICATE_FORMAT} dict")
    sha = cert.get("sha256")
    if not isinstance(sha, str) or not sha:
        raise GalleryError("add_certificate: the certificate has no sha256")
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
        v = find_version(conn, info.get("fingerprint"), f"{what} {side}")
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


class SearchResult(NamedTuple):
    """Per query: the ids found, best first, their cosine scores [Q, k] float32 and their versions.

    Every row has min(k, items searched) places; a place an approximate index left empty has id "",
    version "" and score -inf.
    """

    ids: list[list[str]]
    scores: np.ndarray
    versions: list[list[str]]


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """float32 C-ordered copy of ``x`` with unit L2 rows (an all-zero row stays zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))
    return np.ascontiguousarray(x / np.maximum(norms, np.float32(1e-12))[:, None], dtype=np.float32)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (FAISS errors span several lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def new_index(factory: str, dim: int) -> object:
    """An empty inner-product ``IndexIDMap2`` over ``faiss.index_factory(dim, factory)``."""
    import faiss

    return faiss.IndexIDMap2(faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT))


def factory_is_valid(factory: str) -> bool:
    """Whether FAISS accepts ``factory`` for at least one common embedding dimension."""
    import faiss

    for dim in (64, 128, 256, 512):
        try:
            faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            return True
        except RuntimeError:
            continue
    return False


class IndexSet:
    """The in-memory indexes of one open store, keyed by :data:`Block`, built on first use.

    ``commit`` is the store's commit counter the indexes reflect; the store drops them all when the
    file's counter differs (another process committed). Indexes of at least :data:`CACHE_MIN_ITEMS`
    items are also written to ``cache`` (a folder of the store), named by block, commit counter and
    item count, so that a later open at the same commit reads them instead of rebuilding; a file of
    another commit is never read (and is removed when its block is written again). The cache is
    best effort: a file that cannot be written or read is rebuilt from the store.
    """

    def __init__(self, factory: str, cache: Path | None = None) -> None:
        self.factory = factory
        self.cache = cache
        self.indexes: dict[Block, object] = {}
        self.commit = -1

    def _file(self, block: Block, count: int) -> Path | None:
        if self.cache is None:
            return None
        return self.cache / f"v{block[0]}-{block[1]}-{block[2]}-c{self.commit}-n{count}.faiss"

    def load(self, block: Block, count: int) -> bool:
        """Read ``block``'s index written at this commit with ``count`` items, if there is one."""
        path = self._file(block, count)
        if path is None or count < CACHE_MIN_ITEMS or not path.is_file():
            return False
        import faiss

        try:
            index = faiss.read_index(str(path))
        except RuntimeError:
            return False
        if index.ntotal != count or index.d != block[2] - block[1]:
            return False
        self.indexes[block] = index
        return True

    def save(self, block: Block) -> None:
        """Write ``block``'s index to the cache (best effort) and remove its files of other commits."""
        index = self.indexes[block]
        path = self._file(block, int(index.ntotal))
        if path is None or index.ntotal < CACHE_MIN_ITEMS:
            return
        import faiss

        from bctkit.storage import atomic_path

        try:
            with atomic_path(path) as tmp:
                faiss.write_index(index, str(tmp))
            for old in path.parent.glob(f"v{block[0]}-{block[1]}-{block[2]}-c*.faiss"):
                if old != path:
                    old.unlink(missing_ok=True)
        except (OSError, RuntimeError, BctkitError):
            return

    def clear(self) -> None:
        """Forget every index (they are rebuilt from the store when needed)."""
        self.indexes.clear()
        self.commit = -1

    def build(self, block: Block, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Index ``vectors`` (raw, full version rows) under ``keys``; untrained indexes train on them."""
        _, a, b = block
        index = new_index(self.factory, b - a)
        data = normalize_rows(vectors[:, a:b]) if len(vectors) else np.zeros((0, b - a), np.float32)
        if not index.is_trained:
            index.train(data)
        if len(keys):
            index.add_with_ids(data, np.ascontiguousarray(keys, dtype=np.int64))
        self.indexes[block] = index

    def blocks_of(self, vid: int) -> list[Block]:
        """The built blocks of version ``vid``."""
        return [blk for blk in self.indexes if blk[0] == vid]

    def add(self, vid: int, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add items of version ``vid`` (raw rows) to each of its built indexes."""
        for blk in self.blocks_of(vid):
            _, a, b = blk
            data = normalize_rows(vectors[:, a:b])
            self.indexes[blk].add_with_ids(data, np.ascontiguousarray(keys, dtype=np.int64))

    def remove(self, vid: int, keys: np.ndarray) -> None:
        """Remove items by key from each built index of version ``vid``."""
        for blk in self.blocks_of(vid):
            self.indexes[blk].remove_ids(np.ascontiguousarray(keys, dtype=np.int64))

    def search(self, block: Block, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rule-exact top-k of one index for normalised ``queries``: (scores [Q, k], keys [Q, k])."""
        index = self.indexes[block]
        return rule_topk(index, queries, min(k, int(index.ntotal)))


def _rank(scores: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first k by decreasing score, equal scores by increasing key."""
    order = np.lexsort((keys, -scores.astype(np.float64)), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(keys, order, 1)


def _faiss_search(index: object, q: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS search with empty places (label -1) turned into (-inf, NO_KEY)."""
    scores, labels = index.search(q, depth)
    empty = labels < 0
    if empty.any():
        scores = np.where(empty, -np.inf, scores).astype(np.float32)
        labels = np.where(empty, NO_KEY, labels)
    return scores.astype(np.float32, copy=False), labels.astype(np.int64, copy=False)


def rule_topk(index: object, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k items of ``index`` per query under the ranking rule (k <= index.ntotal)."""
    n = int(index.ntotal)
    if k <= 0 or len(q) == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    depth = min(k + 1, n)
    scores, keys = _faiss_search(index, q, depth)
    out_s, out_k = _rank(scores[:, :depth], keys[:, :depth], k)
    rows = _tied_rows(scores, keys, k, depth, n)
    while rows.size:
        depth = min(2 * depth, n)
        s, kk = _faiss_search(index, q[rows], depth)
        out_s[rows], out_k[rows] = _rank(s, kk, k)
        rows = rows[_tied_rows(s, kk, k, depth, n)]
    return out_s, out_k


def _tied_rows(scores: np.ndarray, keys: np.ndarray, k: int, depth: int, n: int) -> np.ndarray:
    """Rows whose k-th score equals the last score returned at ``depth`` (a tie may go deeper)."""
    if depth >= n or depth <= k:
        return np.zeros(0, np.int64)
    kth = scores[:, k - 1]
    tied = (scores[:, depth - 1] == kth) & (keys[:, k - 1] != NO_KEY)
    return np.nonzero(tied)[0]


def merge(parts: Iterable[tuple[np.ndarray, np.ndarray, int]], n_queries: int, k: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-index rule-exact lists (scores, keys, version id) into one ranking of k places.

    Returns (scores [Q, k], keys [Q, k], version ids [Q, k]); k is clamped to the places given.
    """
    parts = [p for p in parts if p[0].shape[1]]
    if not parts:
        return (np.zeros((n_queries, 0), np.float32), np.zeros((n_queries, 0), np.int64),
                np.zeros((n_queries, 0), np.int64))
    scores = np.concatenate([p[0] for p in parts], axis=1)
    keys = np.concatenate([p[1] for p in parts], axis=1)
    vids = np.concatenate([np.full(p[0].shape, p[2], np.int64) for p in parts], axis=1)
    k = min(k, scores.shape[1])
    order = np.lexsort((keys, -scores.astype(np.float64)), axis=-1)[:, :k]
    return (np.take_along_axis(scores, order, 1).astype(np.float32, copy=False),
            np.take_along_axis(keys, order, 1), np.take_along_axis(vids, order, 1))


def search_items(conn: sqlite3.Connection, indexes: IndexSet, version: str, queries: Any, k: Any
                 ) -> SearchResult:
    """Top-k of the store behind ``conn`` (inside one read transaction) for ``version`` queries."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise GalleryError(f"search: k must be a positive integer, got {k!r}")
    v = find_version(conn, version, "search")
    q = check_vectors(queries, None, v, "search: queries")
    plan = _plan(conn, v)
    _ensure(conn, indexes, [blk for blk, _ in plan])
    parts = []
    for blk, (qa, qb) in plan:
        try:
            s, keys = indexes.search(blk, normalize_rows(q[:, qa:qb]), int(k))
        except RuntimeError as exc:
            raise GalleryError(f"search: FAISS failed ({first_line(exc)})") from None
        parts.append((s, keys, blk[0]))
    scores, keys, vids = merge(parts, len(q), int(k))
    found = np.unique(keys[keys != NO_KEY])
    names = dict(conn.execute("SELECT key, id FROM items WHERE key IN (SELECT value FROM json_each(?))",
                              (json.dumps(found.tolist()),)))
    fps = {x.vid: x.fingerprint for x in read_versions(conn)}
    ids = [[names.get(int(c), "") for c in row] for row in keys]
    vers = [[fps.get(int(u), "") if names.get(int(c)) else "" for c, u in zip(kr, ur, strict=True)]
            for kr, ur in zip(keys, vids, strict=True)]
    return SearchResult(ids, scores, vers)


def _plan(conn: sqlite3.Connection, v: Version) -> list[tuple[Block, tuple[int, int]]]:
    """(index block, query coordinates) for every version with items; refused without a certificate."""
    certs = {r[0]: json.loads(r[1]) for r in conn.execute(
        "SELECT gallery_vid, body FROM certificates WHERE query_vid=?", (v.vid,))}
    plan = []
    for u in read_versions(conn):
        if u.count == 0:
            continue
        if u.vid == v.vid:
            plan.append(((u.vid, 0, u.dim), (0, v.dim)))
            continue
        cert = certs.get(u.vid)
        if cert is None:
            raise GalleryError(f"search: {v.label} queries cannot search the {u.count} items of {u.label}: "
                               "a compatibility certificate for this pair is needed (add_certificate) or "
                               "those items must be backfilled")
        (qa, qb), (ga, gb) = cert["query_dims"], cert["gallery_dims"]
        plan.append(((u.vid, int(ga), int(gb)), (int(qa), int(qb))))
    return plan


def _ensure(conn: sqlite3.Connection, indexes: IndexSet, blocks: list[Block]) -> None:
    """Build the missing indexes of ``blocks`` from the items (all of them when stale)."""
    commit = int(conn.execute("SELECT value FROM meta WHERE key='commit'").fetchone()[0])
    if commit != indexes.commit:
        indexes.clear()
        indexes.commit = commit
    counts = {x.vid: x.count for x in read_versions(conn)}
    missing = [b for b in blocks if b not in indexes.indexes and not indexes.load(b, counts[b[0]])]
    if not missing:
        return
    vids = sorted({b[0] for b in missing})
    keys: dict[int, list[int]] = {u: [] for u in vids}
    blobs: dict[int, list[bytes]] = {u: [] for u in vids}
    cur = conn.execute(f"SELECT key, vid, vec FROM items WHERE vid IN ({','.join('?' * len(vids))}) "
                       "ORDER BY key", vids)
    while rows := cur.fetchmany(_FETCH):
        for key, u, blob in rows:
            keys[u].append(key)
            blobs[u].append(blob)
    dims = {x.vid: x.dim for x in read_versions(conn)}
    for u in vids:
        vec = np.frombuffer(b"".join(blobs.pop(u)), dtype="<f4").reshape(-1, dims[u])
        for blk in (b for b in missing if b[0] == u):
            try:
                indexes.build(blk, np.array(keys[u], dtype=np.int64), vec)
            except RuntimeError as exc:
                msg = f"search: cannot build the {indexes.factory!r} index ({first_line(exc)})"
                raise GalleryError(msg) from None
            indexes.save(blk)
