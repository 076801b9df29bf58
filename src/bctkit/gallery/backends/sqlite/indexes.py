"""The FAISS indexes derived from a gallery store's items, and top-k under the ranking rule.

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

import contextlib
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bctkit.errors import BctkitError
from bctkit.gallery.ranking import NO_KEY, normalize_rows
from bctkit.gallery.search import Block

"""(version id, first coordinate, end coordinate) of an index."""
CACHE_MIN_ITEMS = 20_000
"""Indexes with fewer items are rebuilt on open rather than written to the store's index cache."""

def sampled_digest(path: Path, chunks: int = 256, size: int = 4096) -> str:
    """sha256 of a file's length and of ``chunks`` blocks of ``size`` bytes spread evenly over it: a
    file of other vectors differs in every block, and reading 1 MiB keeps a cached index's open fast
    (it catches another file, not a byte flipped between the samples)."""
    length = path.stat().st_size
    h = hashlib.sha256(str(length).encode())
    with open(path, "rb") as fh:
        for i in range(chunks):
            fh.seek(length * i // chunks)
            h.update(fh.read(size))
    return h.hexdigest()


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
    another commit is never read, and files of earlier commits are removed whenever one is written.
    The cache is best effort: a file that cannot be written or read is rebuilt from the store.
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

    def load(self, block: Block, count: int, source: Callable[[], str]) -> bool:
        """Read ``block``'s index written at this commit with ``count`` items, if there is one and
        its record (``<file>.json``) says it was built from this store's items (``source()``: the
        store's :meth:`.segments.View.digest`) and was this very file (its sampled
        digest): an index file of other vectors under the cache's name is rebuilt, not trusted."""
        path = self._file(block, count)
        if path is None or count < CACHE_MIN_ITEMS or not path.is_file():
            return False
        import faiss

        try:
            record = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            if record != {"source": source(), "file": sampled_digest(path)}:
                return False
            index = faiss.read_index(str(path))
        except (OSError, ValueError, RuntimeError):
            return False
        if index.ntotal != count or index.d != block[2] - block[1]:
            return False
        self.indexes[block] = index
        return True

    def save(self, block: Block, source: Callable[[], str]) -> None:
        """Write ``block``'s index to the cache with its record (best effort) and prune the files
        of earlier commits."""
        index = self.indexes[block]
        path = self._file(block, int(index.ntotal))
        if path is None or index.ntotal < CACHE_MIN_ITEMS:
            return
        import faiss

        from bctkit.storage import atomic_path

        try:
            with atomic_path(path) as tmp:
                faiss.write_index(index, str(tmp))
                record = {"source": source(), "file": sampled_digest(tmp)}
            with atomic_path(path.with_suffix(".json")) as tmp:
                tmp.write_text(json.dumps(record), encoding="utf-8")
        except (OSError, RuntimeError, BctkitError):
            return
        self.prune(keep=path)

    def prune(self, keep: Path | None = None) -> None:
        """Remove cached files that no open can read again, those of an earlier commit (the counter
        only grows); best effort."""
        if self.cache is None or not self.cache.is_dir():
            return
        tag = re.compile(r"v\d+-\d+-\d+-c(\d+)-n\d+\.(faiss|json)")
        for old in self.cache.iterdir():
            m = tag.fullmatch(old.name)
            if m is not None and old.with_suffix(".faiss") != keep and int(m.group(1)) < self.commit:
                with contextlib.suppress(OSError):
                    old.unlink()

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
