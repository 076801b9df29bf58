"""Fixtures that run a gallery test on every backend: ``backend`` (parametrised: the SQLite store and
Milvus Lite), ``new_store`` (a fresh store string of that backend under the test's tmp_path) and
:func:`state`, what a gallery holds, to show that a refused call wrote nothing."""

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from bctkit.gallery import open_gallery, parse_store

BACKENDS = ["sqlite", "milvus-lite"]


def store_string(backend: str, where: Path) -> str:
    """The store string of a new ``backend`` gallery at ``where`` (a folder, or ``where``.db)."""
    return str(where) if backend == "sqlite" else f"milvus-lite:{where}.db"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each gallery backend in turn."""
    return request.param


@pytest.fixture
def new_store(tmp_path: Path, backend: str) -> Callable[..., str]:
    """``new_store(name="g")``: the store string of a gallery not created yet, of this backend."""
    return lambda name="g": store_string(backend, tmp_path / name)


def state(store: str) -> tuple:
    """Everything a gallery holds, read through the interface (and, for the SQLite store, the bytes
    of its database file): equal before and after a refused call when it wrote nothing."""
    spec = parse_store(store)
    raw = None
    if spec.backend == "sqlite":
        raw = hashlib.sha256((Path(spec.where) / "gallery.sqlite").read_bytes()).hexdigest()
    with open_gallery(store) as g:
        ids = g.ids()
        vectors, versions = g.get(ids) if ids else ([], [])
        vectors = [np.asarray(v).tobytes() for v in vectors]
        return (raw, g.versions(), g.certificates(), g.backfill_orders(), ids, versions, vectors,
                g.metadata(ids))
