"""Mixed-version search on every backend against a float64 brute force: three versions of different
dims, certificates over whole vectors and over a strict sub-range of the gallery version's vector
(on Milvus a scanned block), exact duplicates whose ties go to the earlier insertion (within and
across versions, across the k-th place), k beyond some versions' item counts and beyond the
gallery, and deleted and replaced items."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bctkit.gallery import create_gallery, open_gallery
from tests.gallery.conftest import BACKENDS, store_string
from tests.gallery.test_search import Mirror, cert

TOL = 1e-5
"""Largest difference allowed between a returned score and the float64 one. The backends compute
cosines in float32 (FAISS, or Milvus's own COSINE kernel on zero-padded vectors, or numpy for a
scanned block), each rounding a dot product of at most 24 unit-scale terms and the norms: errors of
a few 1e-7 at most, so 1e-5 leaves a wide margin. Items whose float64 scores are closer than TOL may
legitimately swap (rounding decides); items further apart may not."""

DIMS = {"a": 16, "b": 24, "c": 8}
# (query version, gallery version) -> (query_dims, gallery_dims). "gallery_dims" short of the
# gallery version's whole vector: a->b [0, 16) of 24, c->a [8, 16) of 16, c->b [16, 24) of 24.
CERTS = {("b", "a"): ([0, 16], [0, 16]), ("a", "b"): ([0, 16], [0, 16]),
         ("a", "c"): ([4, 12], [0, 8]), ("c", "a"): ([0, 8], [8, 16]),
         ("b", "c"): ([0, 8], [0, 8]), ("c", "b"): ([0, 8], [16, 24])}


def build(g, rng: np.random.Generator) -> tuple[Mirror, dict[str, np.ndarray]]:
    """Fill gallery ``g`` (and its mirror): a 300 items, b 150, c 4; the direction ``t16`` appears
    in a's vectors and b's first 16 dims at exact power-of-two scales, ``t8`` in c's vectors, a's
    dims [8, 16) and b's [16, 24): exact ties within and across versions, keys interleaved."""
    mirror = Mirror()
    t16 = rng.standard_normal(16).astype(np.float32)
    t8 = rng.standard_normal(8).astype(np.float32)
    for fp, dim in DIMS.items():
        g.add_version(fp, dim, name=f"model-{fp}")
    for (q, gv), (qd, gd) in CERTS.items():
        g.add_certificate(cert(q, DIMS[q], gv, DIMS[gv], qd, gd))
    g.add_version("unused", 4)  # declared, no items: needs no certificate
    for step in range(3):
        ids = [f"a{step}-{i}" for i in range(100)]
        a = rng.standard_normal((100, 16)).astype(np.float32)
        a[[3, 40, 41]] = t16 * np.float32(2.0**step)
        a[[7, 60], 8:] = t8 * np.float32(0.5**step)
        g.add(ids, a, "a", [{"i": i} for i in range(100)])
        mirror.add(ids, a, "a")
        ids = [f"b{step}-{i}" for i in range(50)]
        b = rng.standard_normal((50, 24)).astype(np.float32)
        b[[5, 30], :16] = t16
        b[[9], 16:] = t8 * np.float32(4.0)
        g.add(ids, b, "b")
        mirror.add(ids, b, "b")
        if step < 2:
            ids = [f"c{step}-{i}" for i in range(2)]
            c = np.stack([t8, rng.standard_normal(8).astype(np.float32)]) * np.float32(2.0**step)
            g.add(ids, c, "c")
            mirror.add(ids, c, "c")
    moved = ["a0-40", "a1-3", "a2-41", "a0-7"] + [f"a{s}-{i}" for s in range(3) for i in range(0, 100, 9)]
    vec = rng.standard_normal((len(moved), 24)).astype(np.float32)
    vec[:3, :16] = t16 * np.float32(8.0)  # replaced items keep their keys: they tie early in b
    vec[3, 16:] = t8
    g.replace(moved, vec, "b")
    mirror.replace(moved, vec, "b")
    gone = ["a0-3", "b1-5", "c0-0", "a2-50"]  # the first t16 item of a, of b, the first t8 of c
    g.delete(gone)
    mirror.delete(gone)
    return mirror, {"t16": t16, "t8": t8}


@pytest.fixture(scope="module", params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[str, Mirror, dict[str, np.ndarray]]]:
    """A gallery built by :func:`build` on each backend (searched only, so built once)."""
    where = store_string(request.param, tmp_path_factory.mktemp("conf") / "g")
    with create_gallery(where) as g:
        mirror, ties = build(g, np.random.default_rng(0))
    return where, mirror, ties


def ranking(mirror: Mirror, q: np.ndarray, version: str) -> tuple[np.ndarray, np.ndarray]:
    """(items by rank [Q, n], scores [Q, n]) in float64: each compared block normalised, a stable
    sort by decreasing score (exactly equal scores: the earlier insertion first)."""
    cols = []
    for _, ver, vec in mirror.items:
        (qa, qb), (ga, gb) = ((0, DIMS[version]), (0, DIMS[ver])) if ver == version else CERTS[(version, ver)]
        x = q[:, qa:qb].astype(np.float64)
        y = vec[ga:gb].astype(np.float64)
        cols.append((x / np.linalg.norm(x, axis=1, keepdims=True)) @ (y / np.linalg.norm(y)))
    scores = np.stack(cols, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    return order, np.take_along_axis(scores, order, 1)


def check(res, mirror: Mirror, q: np.ndarray, version: str, k: int) -> None:
    """``res`` agrees with the brute force: scores within TOL place by place, ids exactly where the
    float64 gap to both neighbours exceeds TOL, near-ties as sets, exact ties by insertion."""
    order, ref = ranking(mirror, q, version)
    n = len(mirror.items)
    kk = min(k, n)
    assert res.scores.dtype == np.float32 and res.scores.shape == (len(q), kk)
    key = {item[0]: j for j, item in enumerate(mirror.items)}  # insertion rank
    ver = {item[0]: item[1] for item in mirror.items}
    for r in range(len(q)):
        ids, want = res.ids[r], [mirror.items[j][0] for j in order[r]]
        s = ref[r]
        assert len(ids) == kk and len(set(ids)) == kk and set(ids) <= set(key)
        assert res.versions[r] == [ver[i] for i in ids]
        np.testing.assert_allclose(res.scores[r], s[:kk], rtol=0, atol=TOL)
        gap = np.diff(s)  # <= 0
        start = 0
        for p in range(1, n + 1):  # groups: runs of places closer than TOL
            if p < n and -gap[p - 1] <= TOL:
                continue
            if start < kk:
                group, got = set(want[start:p]), ids[start:min(p, kk)]
                if p - start == 1:
                    assert got == want[start:p], (r, start)
                elif p <= kk:
                    assert set(got) == group, (r, start)
                else:
                    assert set(got) <= group, (r, start)
            start = p
        exact = {i: float(sc) for i, sc in zip(want, s, strict=True)}
        for p, i in enumerate(ids):  # an exact tie: every earlier-inserted equal item comes first
            before = {j for j in want if exact[j] == exact[i] and key[j] < key[i]}
            assert before <= set(ids[:p]), (r, i, sorted(before - set(ids[:p])))


def queries(version: str, ties: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """Six queries of ``version``: four random, one along t16 (t8 for c), one its opposite."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((6, DIMS[version])).astype(np.float32)
    if version == "c":
        q[4], q[5] = ties["t8"] * 3, -ties["t8"]
    else:
        q[4, :16], q[5, :16] = ties["t16"] * 3, -ties["t16"]
        if version == "a":
            q[3, 4:12] = ties["t8"]  # a -> c compares a's [4, 12) with c's t8 items
    return q


@pytest.mark.parametrize("version", ["a", "b", "c"])
@pytest.mark.parametrize("k", [1, 3, 7, 40])  # c holds 3 items, b 189, a 258
def test_mixed_search_equals_float64_brute_force(world, version: str, k: int) -> None:
    where, mirror, ties = world
    q = queries(version, ties, k)
    with open_gallery(where) as g:
        check(g.search(q, version, k), mirror, q, version, k)


def test_the_tied_top_places_are_the_earliest_items(world) -> None:
    """t16 queries of a: 10 items tie at the top (a's t16 items, b's whose first 16 dims are t16,
    the replaced ones): the first 4 places are the 4 earliest of them, in insertion order."""
    where, mirror, ties = world
    q = ties["t16"][None] * np.float32(0.25)
    order, ref = ranking(mirror, q, "a")
    top = [mirror.items[j][0] for j, s in zip(order[0], ref[0], strict=True) if s > 1 - 1e-9]
    assert len(top) >= 8 and {i[0] for i in top} == {"a", "b"}  # the tie spans both versions
    with open_gallery(where) as g:
        res = g.search(q, "a", 4)
    assert res.ids[0] == top[:4] and res.ids[0] == ["a0-40", "a0-41", "b0-5", "b0-30"]
    np.testing.assert_allclose(res.scores[0], 1.0, atol=TOL)


@pytest.mark.parametrize("version", ["a", "c"])
def test_k_beyond_the_gallery_returns_every_item(world, version: str) -> None:
    where, mirror, ties = world
    q = queries(version, ties, 99)[3:5]
    with open_gallery(where) as g:
        res = g.search(q, version, 10_000)
    assert res.scores.shape == (2, len(mirror.items))
    check(res, mirror, q, version, 10_000)


def test_a_version_declared_without_items_searches_every_certified_version(tmp_path: Path, backend: str
                                                                           ) -> None:
    """An empty gallery returns empty rows; queries of a version whose own block is empty still
    search the versions a certificate allows."""
    with create_gallery(store_string(backend, tmp_path / "g")) as g:
        g.add_version("a", 16)
        g.add_version("c", 8)
        res = g.search(np.ones((2, 8), np.float32), "c", 5)
        assert res.ids == [[], []] and res.versions == [[], []] and res.scores.shape == (2, 0)
        g.add_certificate(cert("c", 8, "a", 16, [0, 8], [8, 16]))
        mirror = Mirror()
        items = np.random.default_rng(1).standard_normal((6, 16)).astype(np.float32)
        g.add([f"x{i}" for i in range(6)], items, "a")
        mirror.add([f"x{i}" for i in range(6)], items, "a")
        q = items[[2, 4], 8:] * np.float32(3.0)
        res = g.search(q, "c", 10)
        check(res, mirror, q, "c", 10)
        assert [row[0] for row in res.ids] == ["x2", "x4"]


@pytest.mark.parametrize("k", [2, 5, 9, 30])
def test_milvus_never_asks_past_its_top_k_limit(tmp_path: Path, monkeypatch, k: int) -> None:
    """With Milvus's top-k limit (16384 on a server; Milvus Lite has none) lowered to 6: k below it,
    at it and past it, and ties across the limit (12 equal items), give the brute-force ranking
    without a search asking for more than 6 places (the rest read by scanning)."""
    from bctkit.gallery.backends.milvus import search as milvus_search

    monkeypatch.setattr(milvus_search, "MAX_DEPTH", 6)
    rng = np.random.default_rng(k)
    items = rng.standard_normal((40, 16)).astype(np.float32)
    items[::3] = items[0] * np.float32(2.0)  # 14 exact duplicates of one direction, keys interleaved
    mirror = Mirror()
    mirror.add([f"x{i}" for i in range(40)], items, "a")
    q = np.stack([items[0], -items[0], rng.standard_normal(16).astype(np.float32)])
    with create_gallery(store_string("milvus-lite", tmp_path / "g")) as g:
        g.add_version("a", 16)
        g.add([f"x{i}" for i in range(40)], items, "a")
        limits = []
        search = g._c.search
        monkeypatch.setattr(g._c, "search", lambda *a, **kw: limits.append(kw["limit"]) or search(*a, **kw))
        res = g.search(q, "a", k)
    assert max(limits, default=0) <= 6 and bool(limits) == (k < 6)  # k >= 6: the block is scanned
    check(res, mirror, q, "a", k)
    assert res.ids[0][: min(k, 14)] == [f"x{i}" for i in range(0, 40, 3)][: min(k, 14)]
