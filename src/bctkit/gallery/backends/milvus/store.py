"""The gallery on Milvus (Milvus Lite or a server): the same calls, checks and messages as the SQLite
store, on the collections :mod:`.client` describes.

What a crash leaves: Milvus has no multi-entity transactions. Each write is an upsert of whole
entities (id, seq, version, prior, meta, vector), so every item is always either its old entity or its
new one, never a mix; a call killed part-way may have written some of its items. An add rerun
(``bctkit gallery add``) skips the items stored; a backfill rerun redoes every batch that still holds
an item at the old version, whole (see :mod:`bctkit.gallery.backfill_plan`). Counters (insertion
keys, version ids) are reserved before use, so a crash leaves a gap, never a key used twice.

Concurrency: one process at a time adds or declares (the counters are read-modify-write); backfill
ranks may upsert their own items together (each item is written by one rank). Milvus Lite admits
one process at a time anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from bctkit.errors import FileFormatError
from bctkit.gallery.backends.milvus.client import (
    FORMAT,
    FORMAT_VERSION,
    FP_MAX,
    ID_MAX,
    INDEXES,
    SIDE_SUFFIX,
    VALUE_MAX,
    Side,
    call,
    check_collections,
    connect,
    disconnect,
    index_params,
    items_schema,
    iterate,
    padded,
    vector_norms,
)
from bctkit.gallery.checks import (
    GalleryError,
    Version,
    check_certificate,
    check_declaration,
    check_ids,
    check_priors,
    check_vectors,
    few,
    find_version,
    metadata_json,
    settled,
)
from bctkit.gallery.events import event
from bctkit.gallery.interface import Gallery, StoreSpec, no_lock
from bctkit.gallery.search import SearchResult

FETCH = 4096
"""Ids per get request."""
WRITE_BYTES = 8 << 20
"""About this many vector bytes per upsert request (Milvus caps a request's size)."""
WRITE_ROWS = 20_000
"""At most this many entities per upsert request."""


class MilvusGallery(Gallery):
    """A gallery in a Milvus collection (see the module docstring). Use :meth:`create` or :meth:`open`."""

    records_prior = True

    def __init__(self, spec: StoreSpec, client: Any, fmt: dict) -> None:
        self.spec = spec
        self._c = client
        self._fmt = fmt
        self._items = str(spec.collection)
        self._side = Side(client, self._items + SIDE_SUFFIX, str(spec))

    @property
    def location(self) -> str:
        return str(self.spec)

    @property
    def dim(self) -> int | None:
        """The items collection's vector dimension (None before the first add)."""
        return self._fmt.get("dim")

    @classmethod
    def create(cls, spec: StoreSpec, *, index: str = "Flat", dim: int | None = None, timeout_s: float = 10.0
               ) -> MilvusGallery:
        """Create an empty gallery; ``dim``: the largest embedding dimension any version will have
        (default: the largest declared before the first add). An existing collection is refused."""
        if index not in INDEXES:
            raise GalleryError(f"index {index!r}: a Milvus gallery takes {', '.join(INDEXES)}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise GalleryError(f"--dim {dim!r}: must be a positive integer")
        client = connect(spec.backend, spec.where, timeout_s)
        names = set(call(f"{spec}: list collections", client.list_collections))
        taken = [n for n in (spec.collection, f"{spec.collection}{SIDE_SUFFIX}") if n in names]
        if taken:
            disconnect(client, spec.backend, spec.where)
            raise GalleryError(f"{spec}: collection {taken[0]!r} exists; a new gallery needs a new "
                               "collection name")
        g = cls(spec, client, {"format": FORMAT, "format_version": FORMAT_VERSION, "index": index,
                               "dim": None, "min_dim": dim})
        try:
            g._side.create()
            if dim is not None:
                g._create_items(dim)
            g._side.put({"format": g._fmt})
        except BaseException:
            g.close()
            raise
        return g

    @classmethod
    def open(cls, spec: StoreSpec, *, timeout_s: float = 10.0) -> MilvusGallery:
        """Open an existing gallery; a collection bctkit did not create, or of another dimension than
        its record, is refused (nothing written)."""
        if spec.backend == "milvus-lite" and not os.path.exists(spec.where):  # Milvus Lite would create it
            raise FileFormatError(f"{spec}: no Milvus Lite file {spec.where} (create it with bctkit gallery "
                                  "create)")
        client = connect(spec.backend, spec.where, timeout_s)
        try:
            fmt = check_collections(client, Side(client, f"{spec.collection}{SIDE_SUFFIX}", str(spec)),
                                    str(spec.collection), str(spec))
        except BaseException:
            disconnect(client, spec.backend, spec.where)
            raise
        return cls(spec, client, fmt)

    def close(self) -> None:
        if self._c is not None:
            disconnect(self._c, self.spec.backend, self.spec.where)
            self._c = None

    def _create_items(self, dim: int) -> None:
        call(f"{self.location}: create {self._items}", self._c.create_collection, self._items,
             schema=items_schema(self._c, dim), index_params=index_params(self._c, "vec", self._fmt["index"]),
             consistency_level="Strong")
        self._fmt["dim"] = dim

    # ---- versions and certificates ---------------------------------------------------------------

    def _versions(self, counted: bool = True) -> list[Version]:
        """The declared versions; ``counted=False``: count -1 (not read: a filtered count scans every
        item on Milvus Lite, for calls that use no count)."""
        recs = sorted(self._side.prefixed("version:").values(), key=lambda r: r["vid"])
        return [Version(r["vid"], r["fingerprint"], r["name"], r["dim"], r["layout"],
                        self._count(r["fingerprint"]) if counted else -1) for r in recs]

    def _count(self, fp: str | None) -> int:
        if self.dim is None:
            return 0
        flt = "" if fp is None else f"version == {json.dumps(fp)}"
        rows = call(f"{self.location}: count", self._c.query, self._items, filter=flt,
                    output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def add_version(self, fingerprint: str, dim: int, name: str | None = None, layout: dict | None = None
                    ) -> None:
        wanted = check_declaration(fingerprint, dim, name, layout)
        if len(fingerprint) > FP_MAX or not fingerprint.isprintable() or any(c in fingerprint for c in '"\\'):
            raise GalleryError(f"add_version {fingerprint!r}: a Milvus gallery takes printable fingerprints "
                               f"of at most {FP_MAX} characters without quotes or backslashes")
        key = f"version:{fingerprint}"
        old = self._side.get(key)
        if settled(fingerprint, old, wanted):
            return
        if old is not None:  # a missing name or layout filled in
            filled = {"name": old["name"] or name, "layout": old["layout"] or wanted["layout"]}
            self._side.put({key: {**old, **filled}})
            return
        if self.dim is not None and dim > self.dim:
            raise GalleryError(f"add_version {fingerprint}: dim {dim}, but {self.location} holds vectors "
                               f"of at most {self.dim} dims (fixed by its first add); create the gallery "
                               f"with --dim {dim} or more for this model")
        vid = self._side.next_values("next_vid", 1)
        self._side.put({key: {"vid": vid, "fingerprint": fingerprint, **wanted}})

    def versions(self) -> dict[str, dict]:
        return {v.fingerprint: {"name": v.name, "dim": v.dim, "count": v.count, "layout": v.layout}
                for v in self._versions()}

    def _certs(self) -> list[dict]:
        return sorted(self._side.prefixed("cert:").values(), key=lambda r: r["seq"])

    def add_certificate(self, cert: dict) -> None:
        q, g, _, _ = check_certificate(self._versions(counted=False), cert)
        seq = self._side.next_values("next_cert", 1)
        self._side.put({f"cert:{q.vid}:{g.vid}": {"seq": seq, "query_vid": q.vid, "gallery_vid": g.vid,
                                                  "body": cert}})

    def certificates(self) -> list[dict]:
        return [r["body"] for r in self._certs()]

    def record_backfill_order(self, version: str, order: str) -> None:
        key = f"order:{version}"
        orders = self._side.get(key) or []
        if order not in orders:
            self._side.put({key: [*orders, order]})

    def backfill_orders(self) -> dict[str, list[str]]:
        return {k[len("order:"):]: v for k, v in self._side.prefixed("order:").items()}

    # ---- items ------------------------------------------------------------------------------------

    def _fetch(self, ids: list[str], fields: list[str], what: str | None) -> dict[str, dict]:
        """id -> entity (``fields``) of the stored ones among ``ids``; ``what``: refuse unknown ids."""
        found: dict[str, dict] = {}
        if self.dim is not None:
            for s in range(0, len(ids), FETCH):
                rows = call(f"{self.location}: read", self._c.get, self._items, ids=ids[s:s + FETCH],
                            output_fields=fields)
                found.update((r["id"], r) for r in rows)
        if what is not None and len(found) < len(ids):
            missing = [i for i in ids if i not in found]
            raise GalleryError(f"{what}: {len(missing)} unknown id(s): {few(missing)}")
        return found

    def _write(self, call_name: str, rows: list[dict]) -> None:
        """Upsert whole entities in requests of about :data:`WRITE_BYTES`, with the crash-test events
        (``written`` after the first request when there are several)."""
        event(call_name, "begin")
        step = max(1, min(WRITE_ROWS, WRITE_BYTES // (4 * int(self.dim or 1))))
        for s in range(0, len(rows), step):
            call(f"{self.location}: {call_name}", self._c.upsert, self._items, rows[s:s + step])
            if s == 0 and len(rows) > step:
                event(call_name, "written")
        event(call_name, "committed")

    def _check_ids(self, ids: Sequence[str], what: str) -> list[str]:
        out, _ = check_ids(ids, what)
        long = [i for i in out if len(i) > ID_MAX]
        if long:
            raise GalleryError(f"{what}: ids longer than {ID_MAX} characters: {few(long)}")
        return out

    def add(self, ids: Sequence[str], vectors: np.ndarray, version: str,
            metadata: Sequence[dict] | None = None) -> None:
        ids = self._check_ids(ids, "add")
        versions = self._versions(counted=False)
        v = find_version(versions, version, "add")
        vec = check_vectors(vectors, len(ids), v, "add")
        metas = metadata_json(metadata, len(ids)) or ["{}"] * len(ids)
        if metadata is not None:
            long = [i for i, m in zip(ids, metas, strict=True) if len(m) > VALUE_MAX]
            if long:
                raise GalleryError(f"add: metadata longer than {VALUE_MAX} characters of JSON for "
                                   f"{few(long)}")
        if not ids:
            return
        taken = list(self._fetch(ids, ["id"], None))
        if taken:
            raise GalleryError(f"add: id(s) already in the store: {few([i for i in ids if i in set(taken)])}")
        if self.dim is None:
            self._create_items(max([u.dim for u in versions] + [self._fmt.get("min_dim") or 0]))
            self._side.put({"format": self._fmt})
        first = self._side.next_values("next_seq", len(ids))
        full = padded(vec, int(self.dim))
        self._write("add", [{"id": i, "seq": first + r, "version": version, "prior": -1.0, "meta": metas[r],
                             "vec": full[r]} for r, i in enumerate(ids)])

    def replace(self, ids: Sequence[str], vectors: np.ndarray, version: str,
                priors: np.ndarray | None = None) -> None:
        """Re-embed existing items; each keeps its insertion key and metadata, and records as its
        prior ``priors`` when given, else the norm of the vector replaced (kept when it was already
        at ``version``: a batch written again)."""
        ids = self._check_ids(ids, "replace")
        versions = self._versions(counted=False)
        v = find_version(versions, version, "replace")
        vec = check_vectors(vectors, len(ids), v, "replace")
        given = check_priors(priors, len(ids))
        if not ids:
            return
        old = self._fetch(ids, ["id", "seq", "version", "prior", "meta", "vec"], "replace")
        dims = {u.fingerprint: u.dim for u in versions}
        prior = np.array([float(old[i]["prior"]) for i in ids]) if given is None else given
        for fp in {old[i]["version"] for i in ids} - {version} if given is None else ():
            where = [r for r, i in enumerate(ids) if old[i]["version"] == fp]
            prior[where] = vector_norms(np.array([old[ids[r]]["vec"][: dims[fp]] for r in where], np.float32))
        full = padded(vec, int(self.dim))
        rows = [{"id": i, "seq": old[i]["seq"], "version": version, "prior": float(prior[r]),
                 "meta": old[i]["meta"], "vec": full[r]} for r, i in enumerate(ids)]
        self._write("replace", rows)

    def delete(self, ids: Sequence[str]) -> None:
        ids = self._check_ids(ids, "delete")
        if not ids:
            return
        self._fetch(ids, ["id"], "delete")
        event("delete", "begin")
        for s in range(0, len(ids), FETCH):
            call(f"{self.location}: delete", self._c.delete, self._items, ids=ids[s:s + FETCH])
        event("delete", "committed")

    def get(self, ids: Sequence[str]) -> tuple[np.ndarray | list[np.ndarray], list[str]]:
        ids = list(ids)
        found = self._fetch(ids, ["id", "version", "vec"], "get")
        dims = {u.fingerprint: u.dim for u in self._versions(counted=False)}
        versions = [found[i]["version"] for i in ids]
        rows = [np.asarray(found[i]["vec"][: dims[ver]], dtype=np.float32) for i, ver in zip(ids, versions,
                                                                                             strict=True)]
        if not rows:
            return np.zeros((0, 0), np.float32), versions
        if len({len(r) for r in rows}) == 1:
            return np.stack(rows), versions
        return rows, versions

    def find(self, ids: Sequence[str]) -> list[str | None]:
        ids = self._check_ids(ids, "find")
        found = self._fetch(ids, ["id", "version"], None)
        return [found[i]["version"] if i in found else None for i in ids]

    def metadata(self, ids: Sequence[str]) -> list[dict]:
        ids = list(ids)
        found = self._fetch(ids, ["id", "meta"], "metadata")
        return [json.loads(found[i]["meta"]) for i in ids]

    def count(self, version: str | None = None) -> int:
        if version is not None:
            find_version(self._versions(counted=False), version, "count")
        return self._count(version)

    def ids(self, version: str | None = None) -> list[str]:
        flt = ""
        if version is not None:
            find_version(self._versions(counted=False), version, "ids")
            flt = f"version == {json.dumps(version)}"
        if self.dim is None:
            return []
        parts = iterate(self._c, self._items, ["id", "seq"], self.location, flt)
        pairs = [(e["seq"], e["id"]) for part in parts for e in part]
        return [i for _, i in sorted(pairs)]

    def scan(self, step: int = 65536, norms: bool = True
             ) -> Iterator[tuple[list[str], list[str], np.ndarray, np.ndarray]]:
        if self.dim is None:
            return
        dims = {u.fingerprint: u.dim for u in self._versions(counted=False)}
        seqs, ids, vers, sizes, priors = [], [], [], [], []
        fields = ["id", "seq", "version", "prior", *(["vec"] if norms else [])]
        for part in iterate(self._c, self._items, fields, self.location):
            size = np.zeros(len(part))
            for fp in {e["version"] for e in part} if norms else ():
                where = [r for r, e in enumerate(part) if e["version"] == fp]
                size[where] = vector_norms(np.array([part[r]["vec"][: dims[fp]] for r in where], np.float32))
            sizes.append(size)
            for e in part:
                seqs.append(e["seq"])
                ids.append(e["id"])
                vers.append(e["version"])
                priors.append(e["prior"])
        if not seqs:
            return
        order = np.argsort(np.asarray(seqs, np.int64), kind="stable")
        norm = np.concatenate(sizes)[order]
        prior = np.asarray(priors, np.float64)[order]
        for s in range(0, len(order), step):
            o = order[s:s + step]
            yield [ids[j] for j in o], [vers[j] for j in o], norm[s:s + step], prior[s:s + step]

    def verify(self) -> None:
        bad: list[str] = []
        if self.dim is not None:
            for part in iterate(self._c, self._items, ["id", "vec"], self.location):
                vec = np.asarray([e["vec"] for e in part], dtype=np.float32)
                bad += [e["id"] for e, ok in zip(part, np.isfinite(vec).all(axis=1), strict=True) if not ok]
        if bad:
            raise FileFormatError(f"{self.location}: corrupt gallery store ({len(bad)} damaged item(s): "
                                  f"vectors holding NaN or Inf: {few(bad)})")

    def search(self, queries: np.ndarray, version: str, k: int) -> SearchResult:
        from bctkit.gallery.backends.milvus.search import search_items

        return search_items(self, queries, version, k)

    def backfill_lock(self) -> contextlib.AbstractContextManager[None]:
        """Nothing to take: Milvus Lite admits one process at a time (a second one cannot open the
        file), and on a server two backfills of one version write the same vectors to the same
        items (each batch is embedded whole), so they waste work but do not conflict."""
        return no_lock()
