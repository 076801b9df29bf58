"""The gallery interface every backend implements, and the store string that picks one.

A gallery holds items (an id, the model version that embedded it, its vector and metadata), the
declared versions and the passed compatibility certificates that allow mixed-version search. Two
backends implement :class:`Gallery`:

- a folder path: the embedded SQLite + FAISS store (:mod:`bctkit.gallery.backends.sqlite`), every
  call one durable SQLite transaction;
- ``milvus-lite:PATH.db[#COLLECTION]`` (Milvus Lite, embedded), ``milvus://HOST:PORT/COLLECTION``
  or ``http(s)://HOST:PORT/COLLECTION`` (a Milvus server or cluster):
  :mod:`bctkit.gallery.backends.milvus`, each item one entity, versions and certificates in a side
  collection, so every machine that reaches the server sees the same gallery.

Everything above the backends (add, search, certify, backfill, status, the CLI) goes through this
interface only.
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bctkit.gallery.checks import GalleryError
from bctkit.gallery.search import SearchResult

DEFAULT_COLLECTION = "bctkit_gallery"
"""The collection of a ``milvus-lite:PATH.db`` store string that names none."""
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")


@dataclass(frozen=True)
class StoreSpec:
    """A parsed store string: the backend, where it is (a folder, a Lite file or a server URI) and,
    for Milvus, the collection."""

    backend: Literal["sqlite", "milvus-lite", "milvus"]
    where: str
    collection: str | None = None

    def __str__(self) -> str:
        if self.backend == "sqlite":
            return self.where
        if self.backend == "milvus-lite":
            return f"milvus-lite:{self.where}#{self.collection}"
        return f"{self.where}/{self.collection}"


def parse_store(text: str | os.PathLike[str]) -> StoreSpec:
    """The backend a store string names; a string of neither form is refused in one line."""
    try:
        s = os.fspath(text)
    except TypeError:
        s = None
    if not isinstance(s, str) or not s:
        raise GalleryError(f"store {text!r}: expected a folder path, milvus-lite:PATH.db, "
                           "milvus://HOST:PORT/COLLECTION or http(s)://HOST:PORT/COLLECTION")
    if s.startswith("milvus-lite:"):
        path, _, name = s[len("milvus-lite:"):].partition("#")
        name = name or DEFAULT_COLLECTION
        if not path.endswith(".db"):
            raise GalleryError(f"store {s!r}: a Milvus Lite store is milvus-lite:PATH.db (a file name "
                               "ending in .db), optionally #COLLECTION")
        _check_name(s, name)
        return StoreSpec("milvus-lite", path, name)
    m = re.fullmatch(r"(milvus|https?)://([^/?#]+)/([^/?#]+)/?", s)
    if m:
        scheme, host, name = m.groups()
        _check_name(s, name)
        return StoreSpec("milvus", f"{'http' if scheme == 'milvus' else scheme}://{host}", name)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", s):
        raise GalleryError(f"store {s!r}: not a store string bctkit reads; expected a folder path, "
                           "milvus-lite:PATH.db, milvus://HOST:PORT/COLLECTION or "
                           "http(s)://HOST:PORT/COLLECTION")
    return StoreSpec("sqlite", s)


def _check_name(s: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        raise GalleryError(f"store {s!r}: collection {name!r} is not a Milvus collection name (letters, "
                           "digits and underscores, not starting with a digit)")


class Gallery(abc.ABC):
    """Items embedded by several model versions, searched together through certificates.

    Every error is one line: refused input raises :class:`GalleryError`, an unreadable or foreign
    store :class:`~bctkit.errors.FileFormatError`; a refused call writes nothing.
    """

    records_prior: bool = False
    """Whether :meth:`replace` keeps, per item, the norm of the vector it replaced (so a backfill
    restarted after its items were written out of order can rebuild its plan; see
    :mod:`bctkit.gallery.backfill_plan`)."""

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """The store string, for messages."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store (idempotent)."""

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # versions and certificates
    @abc.abstractmethod
    def add_version(self, fingerprint: str, dim: int, name: str | None = None, layout: dict | None = None
                    ) -> None:
        """Declare a model version; again is a no-op, a conflicting dim, name or layout is refused."""

    @abc.abstractmethod
    def versions(self) -> dict[str, dict]:
        """fingerprint -> {"name", "dim", "count", "layout"}, in declaration order."""

    @abc.abstractmethod
    def add_certificate(self, cert: dict) -> None:
        """Store a passed certificate (one per ordered pair of versions; a new one replaces it)."""

    @abc.abstractmethod
    def certificates(self) -> list[dict]:
        """The stored certificates, in the order they were added."""

    @abc.abstractmethod
    def record_backfill_order(self, version: str, order: str) -> None:
        """Note that a backfill re-embedded items with ``version`` in ``order``."""

    @abc.abstractmethod
    def backfill_orders(self) -> dict[str, list[str]]:
        """version -> the orders its backfills used, in first-use order."""

    # items
    @abc.abstractmethod
    def add(self, ids: Sequence[str], vectors: np.ndarray, version: str,
            metadata: Sequence[dict] | None = None) -> None:
        """Add new items of ``version``; an id already stored is refused."""

    @abc.abstractmethod
    def replace(self, ids: Sequence[str], vectors: np.ndarray, version: str,
                priors: np.ndarray | None = None) -> None:
        """Re-embed existing items with ``version`` (ids, insertion order and metadata kept).
        ``priors``: one value >= 0 per item that :meth:`scan` returns for it from now on (a
        transformation's uncertainty, which the ``uncertainty`` backfill order reads); None: the
        backend's own (see :attr:`records_prior`)."""

    @abc.abstractmethod
    def delete(self, ids: Sequence[str]) -> None:
        """Remove items (all must exist)."""

    @abc.abstractmethod
    def get(self, ids: Sequence[str]) -> tuple[np.ndarray | list[np.ndarray], list[str]]:
        """(vectors, versions) of ``ids``; one [n, d] array when all share a dimension."""

    @abc.abstractmethod
    def find(self, ids: Sequence[str]) -> list[str | None]:
        """The version of each id, None for an id no item has."""

    @abc.abstractmethod
    def metadata(self, ids: Sequence[str]) -> list[dict]:
        """The metadata dict of each id ({} when none was given)."""

    @abc.abstractmethod
    def count(self, version: str | None = None) -> int:
        """Number of items, of one version or of all."""

    @abc.abstractmethod
    def ids(self, version: str | None = None) -> list[str]:
        """The ids, of one version or of all, in insertion order."""

    @abc.abstractmethod
    def scan(self, step: int = 65536, norms: bool = True
             ) -> Iterator[tuple[list[str], list[str], np.ndarray, np.ndarray]]:
        """Every item in insertion order, in parts: (ids, versions, L2 norms of the vectors (float64;
        zeros without ``norms``: no vector is read), priors (the value given to the item's last
        :meth:`replace`, else where the backend records them the norm of the vector it replaced;
        -1 where none is recorded))."""

    @abc.abstractmethod
    def verify(self) -> None:
        """Read every vector; a store holding NaN or Inf is refused, the damaged items named."""

    @abc.abstractmethod
    def search(self, queries: np.ndarray, version: str, k: int) -> SearchResult:
        """Top-k items over every version's items for ``version`` queries (see
        :mod:`bctkit.gallery.search`); cosine scores, ties to the earlier item."""

    @abc.abstractmethod
    def backfill_lock(self) -> contextlib.AbstractContextManager[None]:
        """Held while a backfill runs; a second backfill of the store is refused at once where the
        backend can tell (see each backend)."""


def open_gallery(store: str | os.PathLike[str], *, timeout_s: float = 10.0) -> Gallery:
    """Open the gallery a store string names (:func:`parse_store`); ``timeout_s`` bounds the wait for
    a Milvus server."""
    spec = parse_store(store)
    if spec.backend == "sqlite":
        from bctkit.gallery.backends.sqlite.store import GalleryStore

        return GalleryStore.open(spec.where)
    from bctkit.gallery.backends.milvus.store import MilvusGallery

    return MilvusGallery.open(spec, timeout_s=timeout_s)


def create_gallery(store: str | os.PathLike[str], *, index: str = "Flat", dim: int | None = None,
                   timeout_s: float = 10.0) -> Gallery:
    """Create an empty gallery where the store string says. ``index``: a FAISS factory string
    (SQLite) or ``Flat`` / a Milvus index type (Milvus); ``dim``: Milvus only, the largest
    embedding dimension any version will have (default: the largest declared before the first add)."""
    spec = parse_store(store)
    if spec.backend == "sqlite":
        from bctkit.gallery.backends.sqlite.store import GalleryStore

        if dim is not None:
            raise GalleryError(f"{store}: --dim is for Milvus stores (the SQLite store takes any "
                               "dimension per version)")
        return GalleryStore.create(spec.where, index=index)
    from bctkit.gallery.backends.milvus.store import MilvusGallery

    return MilvusGallery.create(spec, index=index, dim=dim, timeout_s=timeout_s)


@contextlib.contextmanager
def no_lock() -> Iterator[None]:
    """A backfill lock that locks nothing (a backend where the engine itself admits one writer)."""
    yield
