"""The Milvus side of a gallery: connecting (Milvus Lite or a server) with a bounded wait, pymilvus
errors as one line, and the two collections a bctkit gallery is made of.

- the items collection ``NAME``: one entity per item: ``id`` (the primary key: the item's id),
  ``seq`` (its insertion key: a lower one is an earlier insertion, the ranking rule's tie-break),
  ``version`` (the model fingerprint), ``prior`` (the norm of the vector a replace replaced, -1 when
  none), ``meta`` (its metadata as JSON) and ``vec`` (the vector, zero-padded to the collection's
  dimension: padding changes no cosine, and a version's own dims are read back exactly);
- the side collection ``NAME__bctkit``: small records (``key`` -> JSON ``value``): the format
  record, the declared versions, the certificates, the backfill orders and the counters. Milvus
  requires a vector field in every collection; the side records carry a constant 2-d one.

Both are created with Strong consistency, so a read sees every write acknowledged before it, from
any client.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from bctkit.errors import FileFormatError
from bctkit.gallery.checks import GalleryError, first_line

FORMAT = "bctkit-gallery-milvus"
FORMAT_VERSION = 1
SIDE_SUFFIX = "__bctkit"
ID_MAX = 4096
"""Longest item id (characters) the items collection takes."""
VALUE_MAX = 65535
"""Longest JSON value (metadata, a side record) a VARCHAR field takes."""
FP_MAX = 256
INDEXES = {"Flat": ("FLAT", {}), "FLAT": ("FLAT", {}), "IVF_FLAT": ("IVF_FLAT", {"nlist": 1024}),
           "HNSW": ("HNSW", {"M": 16, "efConstruction": 200})}
"""--index of a Milvus store -> (Milvus index type, its build parameters). Flat is exact."""
ITEM_FIELDS = ["id", "seq", "version", "prior", "meta", "vec"]
T = TypeVar("T")
_LITE_OPEN: dict[str, int] = {}
"""Open clients per Milvus Lite file in this process."""


def call(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with a pymilvus error turned into one line naming ``what``."""
    from pymilvus.exceptions import MilvusException

    try:
        return fn(*args, **kwargs)
    except MilvusException as exc:
        msg = getattr(exc, "message", None) or first_line(exc)
        raise GalleryError(f"{what}: Milvus refused ({first_line(Exception(msg))})") from None


def connect(backend: str, where: str, timeout_s: float) -> Any:
    """A MilvusClient for a Lite file or a server URI, failing in one line within ``timeout_s``."""
    try:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException
    except ImportError:
        raise GalleryError("a Milvus store needs pymilvus and milvus-lite: pip install 'bctkit[milvus]'"
                           ) from None
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # its errors are raised as one line here
    lite_log = logging.getLogger("milvus_lite")  # a failed open logs a traceback: kept (_Why), not shown
    lite_log.propagate = False
    if not lite_log.handlers:
        lite_log.addHandler(logging.NullHandler())
    # Milvus Lite's embedded server logs a traceback for a call it does not implement (the timestamp
    # query_iterator asks for first, then does without); the client still gets every error it must.
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    if backend == "milvus-lite":
        if os.path.exists(where) and not os.path.isdir(where):
            raise FileFormatError(f"{where}: not a Milvus Lite store (a file; Milvus Lite keeps a store in a "
                                  "folder named PATH.db)")
        why = _Why()
        lite_log.addHandler(why)
        try:
            client = MilvusClient(where)
            _LITE_OPEN[os.path.abspath(where)] = _LITE_OPEN.get(os.path.abspath(where), 0) + 1
            return client
        except MilvusException as exc:
            if "DataDirLockedError" in why.cause:
                raise GalleryError(f"{where}: Milvus Lite could not open it (another process has it open: "
                                   "Milvus Lite admits one process at a time)") from None
            text = why.cause or getattr(exc, "message", first_line(exc))
            raise GalleryError(f"{where}: Milvus Lite could not open it ({text})") from None
        finally:
            lite_log.removeHandler(why)
    try:  # a server that needs credentials takes them from MILVUS_TOKEN ("user:password" or an API key)
        return MilvusClient(uri=where, token=os.environ.get("MILVUS_TOKEN", ""), timeout=timeout_s)
    except MilvusException as exc:
        raise GalleryError(f"{where}: could not connect to Milvus (waiting at most {timeout_s:g} s): "
                           f"{first_line(Exception(getattr(exc, 'message', exc)))}") from None


class _Why(logging.Handler):
    """Keeps the exception Milvus Lite logs when it cannot start on a file (pymilvus then says only
    "Open local milvus failed"), as "<type>: <first line>"."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.cause = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            self.cause = f"{type(exc).__name__}: {first_line(exc)}"


def disconnect(client: Any, backend: str, where: str) -> None:
    """Close ``client``; the last client of a Milvus Lite file in this process also stops its embedded
    server, which releases the file for other processes (closing a client alone does not)."""
    client.close()
    if backend != "milvus-lite":
        return
    path = os.path.abspath(where)
    _LITE_OPEN[path] = _LITE_OPEN.get(path, 1) - 1
    if _LITE_OPEN[path] <= 0:
        del _LITE_OPEN[path]
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(path)


def items_schema(client: Any, dim: int) -> Any:
    """The schema of an items collection of ``dim``-d vectors."""
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX)
    schema.add_field("seq", DataType.INT64)
    schema.add_field("version", DataType.VARCHAR, max_length=FP_MAX)
    schema.add_field("prior", DataType.DOUBLE)
    schema.add_field("meta", DataType.VARCHAR, max_length=VALUE_MAX)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=dim)
    return schema


def side_schema(client: Any) -> Any:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=1024)
    schema.add_field("value", DataType.VARCHAR, max_length=VALUE_MAX)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)
    return schema


def index_params(client: Any, field: str, index: str) -> Any:
    kind, params = INDEXES[index]
    p = client.prepare_index_params()
    p.add_index(field, index_type=kind, metric_type="COSINE", params=params)
    return p


class Side:
    """The side collection: JSON records by key."""

    def __init__(self, client: Any, name: str, where: str) -> None:
        self.client, self.name, self.where = client, name, where

    def create(self) -> None:
        call(f"{self.where}: create {self.name}", self.client.create_collection, self.name,
             schema=side_schema(self.client), index_params=index_params(self.client, "v", "Flat"),
             consistency_level="Strong")

    def get(self, key: str) -> Any:
        rows = call(f"{self.where}: read {self.name}", self.client.get, self.name, ids=[key],
                    output_fields=["value"])
        return json.loads(rows[0]["value"]) if rows else None

    def prefixed(self, prefix: str) -> dict[str, Any]:
        """Every record whose key starts with ``prefix`` (a short literal)."""
        rows = call(f"{self.where}: read {self.name}", self.client.query, self.name,
                    filter=f'key like "{prefix}%"', output_fields=["key", "value"])
        return {r["key"]: json.loads(r["value"]) for r in rows}

    def put(self, records: dict[str, Any]) -> None:
        rows = []
        for key, value in records.items():
            text = json.dumps(value, allow_nan=False, separators=(",", ":"))
            if len(text) > VALUE_MAX:
                raise GalleryError(f"{self.where}: record {key!r} is {len(text)} characters of JSON; a "
                                   f"Milvus gallery stores at most {VALUE_MAX}")
            rows.append({"key": key, "value": text, "v": [1.0, 0.0]})
        call(f"{self.where}: write {self.name}", self.client.upsert, self.name, rows)

    def next_values(self, counter: str, n: int) -> int:
        """Reserve ``n`` values of a counter; returns the first. Reserved before the values are used,
        so a crash in between leaves a gap, never a value used twice."""
        first = int(self.get(counter) or 0)
        self.put({counter: first + n})
        return first


def check_collections(client: Any, side: Side, items: str, where: str) -> dict:
    """The format record of a bctkit gallery; a collection bctkit did not create, of another format
    or of another dimension than its record is refused."""
    names = set(call(f"{where}: list collections", client.list_collections))
    if side.name not in names:
        if items in names:
            raise FileFormatError(f"{where}: collection {items!r} was not created by bctkit (no "
                                  f"{side.name!r} beside it); give a new collection name")
        raise FileFormatError(f"{where}: no bctkit gallery {items!r} (create it with bctkit gallery create)")
    call(f"{where}: load {side.name}", client.load_collection, side.name)  # a reopened one is released
    fmt = side.get("format")
    if not isinstance(fmt, dict) or fmt.get("format") != FORMAT:
        raise FileFormatError(f"{where}: collection {side.name!r} holds no bctkit gallery format record")
    if int(fmt.get("format_version", 0)) > FORMAT_VERSION:
        raise FileFormatError(f"{where}: written by a newer bctkit (Milvus gallery format "
                              f"{fmt.get('format_version')}; this bctkit reads up to {FORMAT_VERSION})")
    if items in names:
        desc = call(f"{where}: describe {items}", client.describe_collection, items)
        fields = {f["name"]: f for f in desc.get("fields", [])}
        if set(fields) != set(ITEM_FIELDS):
            raise FileFormatError(f"{where}: collection {items!r} has fields {sorted(fields)}, not a bctkit "
                                  f"gallery's {sorted(ITEM_FIELDS)}")
        call(f"{where}: load {items}", client.load_collection, items)
        dim = int(fields["vec"].get("params", {}).get("dim", -1))
        if dim != fmt.get("dim"):
            raise FileFormatError(f"{where}: collection {items!r} holds {dim}-d vectors but its bctkit "
                                  f"record says {fmt.get('dim')}")
    elif fmt.get("dim") is not None:
        raise FileFormatError(f"{where}: the items collection {items!r} of this gallery is missing")
    return fmt


def iterate(client: Any, name: str, fields: Sequence[str], where: str, flt: str = "", step: int = 16384
            ) -> Iterator[list[dict]]:
    """Every entity of ``name`` matching ``flt``, in parts (unordered)."""
    it = call(f"{where}: read {name}", client.query_iterator, name, batch_size=step, filter=flt,
              output_fields=list(fields))
    try:
        while True:
            part = call(f"{where}: read {name}", it.next)
            if not part:
                return
            yield part
    finally:
        it.close()


def padded(vec: np.ndarray, dim: int) -> np.ndarray:
    """``vec`` [n, d <= dim] zero-padded to [n, dim] float32."""
    if vec.shape[1] == dim:
        return np.ascontiguousarray(vec, dtype=np.float32)
    out = np.zeros((len(vec), dim), np.float32)
    out[:, : vec.shape[1]] = vec
    return out


def vector_norms(vec: np.ndarray) -> np.ndarray:
    """float64 L2 norms of the rows of ``vec`` (a version's own dims): the one computation behind
    both a replace's recorded prior and a scan's norm, so a backfill plan ranks them alike."""
    x = np.asarray(vec, dtype=np.float64)
    return np.sqrt(np.einsum("ij,ij->i", x, x))
