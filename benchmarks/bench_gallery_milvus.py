"""Add and search throughput of bctkit's Milvus gallery against bare pymilvus on the same Milvus Lite,
and against bctkit's SQLite store, on the same vectors.

Three galleries of the same N x D unit vectors (ids ``item-<i>``) are filled in add calls of
``--batch`` items and searched with the same queries:

- bctkit on Milvus Lite: ``create_gallery("milvus-lite:PATH.db#COLL", dim=D)``, one version, then
  ``add`` per batch (which checks that no id is stored yet with a ``get``, reserves insertion keys in
  the side collection and upserts whole entities in requests of about 8 MiB) and ``search``
  (one filtered COSINE search per 1024 queries at depth k + 1, the places' vectors read back by id
  to score them again exactly, a deeper search of any row whose k-th score ties, then the ranking
  rule's sort);
- bare pymilvus on the same Milvus Lite file: a collection of the same fields (id VARCHAR primary
  key, seq INT64, version VARCHAR, prior FLOAT, meta VARCHAR, vec FLOAT_VECTOR), FLAT COSINE index,
  Strong consistency; ``MilvusClient.insert`` of the rows (dicts, the vector a numpy row) per batch,
  and one ``MilvusClient.search`` of all queries at depth k, no filter. Building the row dicts is
  timed as part of the bare add: a bare user has to build them too;
- bctkit's SQLite store (a folder): ``add`` per batch (one durable commit each) and warm ``search``
  (its index built by a first one-query search, not timed in the search figure).

Prints one JSON line: seconds and items/s (queries/s) of each; ``add_ratio`` = bare add seconds /
bctkit add seconds (1.0 = bctkit's add costs no more than a bare insert; the goal is >= 0.9) and
``search_ratio`` likewise; ``sqlite_add_ratio`` = SQLite add seconds / bctkit Milvus add seconds and
``sqlite_search_ratio`` likewise (> 1: the Milvus gallery is the faster); ``same_results``: the share
of top-k places where bctkit's id equals the bare search's (ties may order differently). Each
measurement is repeated (``--repeats``; adds into a fresh collection each time, interleaved bare /
bctkit / SQLite, searches interleaved too) and the fastest is reported, which filters out other
processes on a shared machine; ``loadavg`` is ``os.getloadavg()`` at the start and at the end.

Usage: python benchmarks/bench_gallery.py --backend milvus-lite [--n 1000000] [--dim 128]
       [--queries 1000] [--k 10] [--batch 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bctkit.gallery.interface import create_gallery
from bctkit.gallery.ranking import normalize_rows


def bare_collection(client: Any, name: str, dim: int) -> None:
    """A collection with the fields of a bctkit items collection, FLAT COSINE, Strong consistency."""
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=4096)
    schema.add_field("seq", DataType.INT64)
    schema.add_field("version", DataType.VARCHAR, max_length=256)
    schema.add_field("prior", DataType.FLOAT)
    schema.add_field("meta", DataType.VARCHAR, max_length=65535)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=dim)
    index = client.prepare_index_params()
    index.add_index("vec", index_type="FLAT", metric_type="COSINE", params={})
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")


def bare_add(client: Any, name: str, ids: list[str], vectors: np.ndarray, batch: int) -> float:
    """Seconds to build the row dicts and ``insert`` them, ``batch`` rows per call."""
    t0 = time.perf_counter()
    for s in range(0, len(ids), batch):
        rows = [{"id": ids[j], "seq": j, "version": "v1", "prior": -1.0, "meta": "{}", "vec": vectors[j]}
                for j in range(s, min(s + batch, len(ids)))]
        client.insert(name, rows)
    return time.perf_counter() - t0


def bare_search(client: Any, name: str, queries: np.ndarray, k: int) -> tuple[float, list[list[str]]]:
    """Seconds of one plain COSINE search of every query, and the ids found."""
    t0 = time.perf_counter()
    res = client.search(name, data=list(queries), limit=k, search_params={"metric_type": "COSINE"})
    took = time.perf_counter() - t0
    return took, [[h["id"] for h in hits] for hits in res]


def gallery_add(store: str, ids: list[str], vectors: np.ndarray, batch: int, **create: Any
                ) -> tuple[Any, float]:
    """A new bctkit gallery at ``store`` with version ``v1``, and the seconds of its adds."""
    g = create_gallery(store, **create)
    g.add_version("v1", vectors.shape[1], name="v1")
    t0 = time.perf_counter()
    for s in range(0, len(ids), batch):
        g.add(ids[s:s + batch], vectors[s:s + batch], "v1")
    return g, time.perf_counter() - t0


def timed_search(g: Any, queries: np.ndarray, k: int) -> tuple[float, list[list[str]]]:
    """Seconds of one bctkit search of every query, and the ids found."""
    t0 = time.perf_counter()
    res = g.search(queries, "v1", k)
    return time.perf_counter() - t0, res.ids


def run(args: argparse.Namespace) -> dict:
    """Measure (see the module docstring); the JSON record."""
    from bctkit.gallery.backends.milvus.client import connect, disconnect

    load0 = os.getloadavg()
    rng = np.random.default_rng(0)
    vectors = normalize_rows(rng.standard_normal((args.n, args.dim), dtype=np.float32))
    queries = normalize_rows(rng.standard_normal((args.queries, args.dim), dtype=np.float32))
    ids = [f"item-{i}" for i in range(args.n)]
    t = {key: [] for key in ("bare_add", "bct_add", "sql_add", "bare_search", "bct_search", "sql_search")}
    root = Path(tempfile.mkdtemp(prefix="bench-gallery-milvus-", dir=args.dir))
    db = root / "lite.db"
    try:
        # a plain MilvusClient, opened through bctkit's connect so that closing a gallery of the same Lite
        # file does not stop the embedded server under it (bctkit counts the clients of a Lite file)
        client = connect("milvus-lite", str(db), 10.0)
        for rep in range(args.repeats):
            bare = f"bare_{rep}"
            bare_collection(client, bare, args.dim)
            t["bare_add"].append(bare_add(client, bare, ids, vectors, args.batch))
            g, took = gallery_add(f"milvus-lite:{db}#bct_{rep}", ids, vectors, args.batch, dim=args.dim)
            t["bct_add"].append(took)
            sql, took = gallery_add(str(root / f"sqlite{rep}"), ids, vectors, args.batch)
            t["sql_add"].append(took)
            bare_search(client, bare, queries[:1], args.k)  # warm: load, first-call costs
            g.search(queries[:1], "v1", args.k)
            sql.search(queries[:1], "v1", args.k)  # builds the SQLite store's index
            for _ in range(args.repeats):
                took, bare_ids = bare_search(client, bare, queries, args.k)
                t["bare_search"].append(took)
                took, bct_ids = timed_search(g, queries, args.k)
                t["bct_search"].append(took)
                took, sql_ids = timed_search(sql, queries, args.k)
                t["sql_search"].append(took)
            g.close()
            sql.close()
            client.drop_collection(bare)
            client.drop_collection(f"bct_{rep}")
            client.drop_collection(f"bct_{rep}__bctkit")
            shutil.rmtree(root / f"sqlite{rep}")
        disconnect(client, "milvus-lite", str(db))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = {key: min(v) for key, v in t.items()}
    same = float(np.mean([a == b for ra, rb in zip(bare_ids, bct_ids, strict=True)
                          for a, b in zip(ra, rb, strict=True)]))
    same_sqlite = float(np.mean([a == b for ra, rb in zip(sql_ids, bct_ids, strict=True)
                                 for a, b in zip(ra, rb, strict=True)]))
    n, q = args.n, args.queries
    return {
        "backend": "milvus-lite", "n": n, "dim": args.dim, "queries": q, "k": args.k, "batch": args.batch,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "repeats": args.repeats,
        "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "bare_add_s": round(best["bare_add"], 3), "milvus_add_s": round(best["bct_add"], 3),
        "sqlite_add_s": round(best["sql_add"], 3),
        "bare_add_items_per_s": round(n / best["bare_add"]),
        "milvus_add_items_per_s": round(n / best["bct_add"]),
        "sqlite_add_items_per_s": round(n / best["sql_add"]),
        "add_ratio": round(best["bare_add"] / best["bct_add"], 4),
        "sqlite_add_ratio": round(best["sql_add"] / best["bct_add"], 4),
        "bare_search_s": round(best["bare_search"], 4), "milvus_search_s": round(best["bct_search"], 4),
        "sqlite_search_s": round(best["sql_search"], 4),
        "bare_queries_per_s": round(q / best["bare_search"], 1),
        "milvus_queries_per_s": round(q / best["bct_search"], 1),
        "sqlite_queries_per_s": round(q / best["sql_search"], 1),
        "search_ratio": round(best["bare_search"] / best["bct_search"], 4),
        "sqlite_search_ratio": round(best["sql_search"] / best["bct_search"], 4),
        "same_results": same, "same_results_sqlite": same_sqlite,
        "all_s": {key: [round(x, 4) for x in v] for key, v in t.items()},
    }
