"""Mixed-version search against an independent brute-force reference (full score matrix in float64,
stable sort: ties to the earlier insertion), a BT^2 layout through certificate dims, exact ties
across versions and across the k-th place, refusals, and indexes following later commits. The
mixed search, ties, refusals, certificates and approximate indexes run on every backend (more
mixed-version cases: test_conformance_search.py); the index cache is the SQLite store's."""

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest

from bctkit.gallery import GalleryError, GalleryStore, create_gallery, open_gallery
from tests.gallery.conftest import store_string

D_OLD, D_NEW = 16, 20  # BT^2: the new model's first 16 dims are compatible with the old model


def cert(query: str, q_dim: int, gallery: str, g_dim: int, q_dims: list[int], g_dims: list[int],
         passed: bool = True) -> dict:
    return {"format": "bctkit-compatibility-certificate",
            "query": {"fingerprint": query, "embedding_dim": q_dim, "name": query},
            "gallery": {"fingerprint": gallery, "embedding_dim": g_dim, "name": gallery},
            "query_dims": q_dims, "gallery_dims": g_dims, "passed": passed,
            "sha256": f"{query}-{gallery}" * 4}


class Mirror:
    """The test's own record of the store: (id, version, vector) in insertion order."""

    def __init__(self) -> None:
        self.items: list[list] = []

    def add(self, ids: list[str], vectors: np.ndarray, version: str) -> None:
        self.items += [[i, version, v.copy()] for i, v in zip(ids, vectors, strict=True)]

    def replace(self, ids: list[str], vectors: np.ndarray, version: str) -> None:
        where = {item[0]: item for item in self.items}
        for i, v in zip(ids, vectors, strict=True):
            where[i][1], where[i][2] = version, v.copy()

    def delete(self, ids: list[str]) -> None:
        gone = set(ids)
        self.items = [item for item in self.items if item[0] not in gone]


def reference(mirror: Mirror, queries: np.ndarray, version: str, k: int,
              dims: dict[tuple[str, str], tuple[list[int], list[int]]]) -> tuple[list, np.ndarray, list]:
    """Top-k by brute force: every compared block normalised in float64, the full score matrix, a
    stable sort by decreasing score (equal scores: earlier insertion first)."""
    cols = []
    for _, ver, vec in mirror.items:
        if ver == version:
            (qa, qb), (ga, gb) = (0, queries.shape[1]), (0, len(vec))
        else:
            (qa, qb), (ga, gb) = dims[(version, ver)]
        q = queries[:, qa:qb].astype(np.float64)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        g = vec[ga:gb].astype(np.float64)
        cols.append(q @ (g / np.linalg.norm(g)))
    scores = np.stack(cols, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ids = [[mirror.items[j][0] for j in row] for row in order]
    vers = [[mirror.items[j][1] for j in row] for row in order]
    return ids, np.take_along_axis(scores, order, 1), vers


DIMS = {("new", "old"): ([0, D_OLD], [0, D_OLD]), ("old", "new"): ([0, D_OLD], [0, D_OLD])}


def build(store, rng: np.random.Generator) -> tuple[Mirror, np.ndarray]:
    """Old items, some replaced by BT^2 new embeddings (keys kept), new items, and exact duplicates:
    ``tie`` (16 values) appears 14 times across both versions, keys interleaved."""
    mirror = Mirror()
    tie = rng.standard_normal(D_OLD).astype(np.float32)
    store.add_version("old", D_OLD, name="old")
    store.add_version("new", D_NEW, name="new", layout={"bt2": {"compatible_dims": D_OLD}})
    store.add_certificate(cert("new", D_NEW, "old", D_OLD, *DIMS[("new", "old")]))
    store.add_certificate(cert("old", D_OLD, "new", D_NEW, *DIMS[("old", "new")]))
    for step in range(3):
        ids = [f"o{step}-{i}" for i in range(600)]
        old = rng.standard_normal((600, D_OLD)).astype(np.float32)
        old[[5, 77, 300]] = tie * np.float32(2**step)  # same direction, exact other scales: equal cosines
        store.add(ids, old, "old")
        mirror.add(ids, old, "old")
        ids = [f"n{step}-{i}" for i in range(300)]
        new = rng.standard_normal((300, D_NEW)).astype(np.float32)
        new[[10, 200], :D_OLD] = tie
        store.add(ids, new, "new")
        mirror.add(ids, new, "new")
    moved = [f"o{s}-{i}" for s in range(3) for i in range(0, 600, 7)]  # includes o*-77
    vec = rng.standard_normal((len(moved), D_NEW)).astype(np.float32)
    vec[[m.endswith("-77") for m in moved], :D_OLD] = tie
    store.replace(moved, vec, "new")
    mirror.replace(moved, vec, "new")
    store.delete(["o1-5", "n2-3"])
    mirror.delete(["o1-5", "n2-3"])
    return mirror, tie


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Mirror, np.ndarray]:
    """A SQLite store built by :func:`build`."""
    path = tmp_path / "g"
    with GalleryStore.create(path) as store:
        mirror, tie = build(store, np.random.default_rng(0))
    return path, mirror, tie


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Mirror, np.ndarray]]:
    """backend -> a closed store built by :func:`build` (where, mirror, tie), built once and copied
    by :func:`any_world`."""
    return {}


@pytest.fixture
def any_world(built, backend: str, tmp_path: Path, tmp_path_factory) -> tuple[str, Mirror, np.ndarray]:
    """A store of each backend built by :func:`build` (a copy of one built once), its mirror, tie."""
    if backend not in built:
        where = tmp_path_factory.mktemp("built") / "g"
        with create_gallery(store_string(backend, where)) as store:
            mirror, tie = build(store, np.random.default_rng(0))
        built[backend] = (where if backend == "sqlite" else where.with_suffix(".db"), mirror, tie)
    src, mirror, tie = built[backend]
    shutil.copytree(src, tmp_path / src.name)
    return store_string(backend, tmp_path / "g"), copy.deepcopy(mirror), tie


def check(result, want: tuple[list, np.ndarray, list]) -> None:
    ids, scores, versions = want
    assert result.scores.dtype == np.float32 and result.scores.shape == scores.shape
    assert result.ids == ids
    assert result.versions == versions
    np.testing.assert_allclose(result.scores, scores, atol=2e-6)


@pytest.mark.parametrize("n_queries", [3, 30])  # below and above FAISS's BLAS threshold
@pytest.mark.parametrize("k", [1, 10, 50])
def test_mixed_search_equals_brute_force(any_world, n_queries: int, k: int) -> None:
    path, mirror, tie = any_world
    rng = np.random.default_rng(k + n_queries)
    q_old = rng.standard_normal((n_queries, D_OLD)).astype(np.float32)
    q_old[0] = tie * 4  # ties at the top places, across versions
    q_new = rng.standard_normal((n_queries, D_NEW)).astype(np.float32)
    q_new[1, :D_OLD] = tie
    with open_gallery(path) as store:
        for version, q in (("old", q_old), ("new", q_new)):
            check(store.search(q, version, k), reference(mirror, q, version, k, DIMS))


def test_ties_across_the_kth_place_take_the_earliest_items(any_world) -> None:
    path, mirror, tie = any_world
    q = np.stack([tie, -tie, tie * 0.5]).astype(np.float32)
    want = reference(mirror, q, "old", 6, DIMS)
    n_tied = sum(1 for _, ver, v in mirror.items if np.array_equal(v[:D_OLD] / np.linalg.norm(v[:D_OLD]),
                                                                   tie / np.linalg.norm(tie)))
    assert n_tied > 6 and len(set(want[1][0])) == 1  # the tie spans the 6th place
    with open_gallery(path) as store:
        check(store.search(q, "old", 6), want)


def test_k_beyond_the_gallery_returns_every_item(any_world) -> None:
    path, mirror, _ = any_world
    q = np.random.default_rng(1).standard_normal((4, D_NEW)).astype(np.float32)
    with open_gallery(path) as store:
        res = store.search(q, "new", 10_000)
    ids, scores, versions = reference(mirror, q, "new", 10_000, DIMS)
    assert res.scores.shape == scores.shape == (4, len(mirror.items))
    np.testing.assert_allclose(res.scores, scores, atol=2e-6)  # near-equal scores may swap (float32)
    for got, want, got_v, want_v, s in zip(res.ids, ids, res.versions, versions, scores, strict=True):
        assert sorted(got) == sorted(want)
        assert dict(zip(got, got_v, strict=True)) == dict(zip(want, want_v, strict=True))
        assert got[:5] == want[:5] and np.diff(s).max() <= 0


def test_indexes_follow_later_commits_of_this_and_other_processes(world) -> None:
    path, mirror, _ = world
    rng = np.random.default_rng(2)
    q = rng.standard_normal((8, D_OLD)).astype(np.float32)
    with GalleryStore.open(path) as store, GalleryStore.open(path) as other:
        check(store.search(q, "old", 20), reference(mirror, q, "old", 20, DIMS))  # indexes built
        near = (q[:3] + 0.01 * rng.standard_normal((3, D_OLD))).astype(np.float32)
        store.add(["a", "b", "c"], near, "old")
        mirror.add(["a", "b", "c"], near, "old")
        store.replace(["a"], np.concatenate([near[:1], np.zeros((1, 4), np.float32)], 1), "new")
        mirror.replace(["a"], np.concatenate([near[:1], np.zeros((1, 4), np.float32)], 1), "new")
        check(store.search(q, "old", 20), reference(mirror, q, "old", 20, DIMS))
        other.search(q, "old", 5)
        store.delete(["b"])  # another connection's commit: other's indexes are stale
        mirror.delete(["b"])
        check(other.search(q, "old", 20), reference(mirror, q, "old", 20, DIMS))
        check(store.search(q, "old", 20), reference(mirror, q, "old", 20, DIMS))


def test_a_version_without_certificate_is_refused(any_world) -> None:
    path, mirror, _ = any_world
    q = np.random.default_rng(3).standard_normal((2, D_OLD)).astype(np.float32)
    with open_gallery(path) as store:
        store.add_version("other", D_OLD, name="third")
        store.search(q, "old", 5)  # a version without items needs no certificate
        store.add(["t"], q[:1], "other")
        with pytest.raises(GalleryError, match=r"old \(old\) queries cannot search the 1 items of third "
                                               r"\(other\): a passed compatibility certificate for this pair "
                                               r"is needed \(bctkit gallery certify\)") as info:
            store.search(q, "old", 5)
        assert "\n" not in str(info.value)
        with pytest.raises(GalleryError, match="cannot search the 1 items of third"):
            store.search(np.zeros((1, D_NEW), np.float32) + 1, "new", 5)
        store.add_certificate(cert("old", D_OLD, "other", D_OLD, [0, D_OLD], [0, D_OLD]))
        mirror.add(["t"], q[:1], "other")
        dims = {**DIMS, ("old", "other"): ([0, D_OLD], [0, D_OLD])}
        res = store.search(q, "old", 5)
        check(res, reference(mirror, q, "old", 5, dims))
        assert res.ids[0][0] == "t" and res.versions[0][0] == "other"


@pytest.mark.parametrize(("call", "match"), [
    (lambda s: s.search(np.ones((2, D_OLD), np.float32), "nope", 5), "unknown version 'nope'"),
    (lambda s: s.search(np.ones((2, D_NEW), np.float32), "old", 5), r"shape \(2, 16\), got \(2, 20\)"),
    (lambda s: s.search(np.ones(D_OLD, np.float32), "old", 5), r"shape"),
    (lambda s: s.search(np.full((1, D_OLD), np.nan, np.float32), "old", 5), "NaN or Inf"),
    (lambda s: s.search(np.ones((1, D_OLD), np.float32), "old", 0), "k must be a positive integer"),
])
def test_bad_queries_are_one_line_errors(any_world, call, match: str) -> None:
    path, _, _ = any_world
    with open_gallery(path) as store, pytest.raises(GalleryError, match=match) as info:
        call(store)
    assert "\n" not in str(info.value)


def test_certificates_are_checked_stored_and_replaced(new_store) -> None:
    with create_gallery(new_store()) as store:
        store.add_version("a", 8)
        store.add_version("b", 10)
        for bad, match in [
            (cert("a", 8, "b", 10, [0, 8], [0, 8], passed=False), "compatibility criterion failed"),
            (cert("a", 8, "zz", 10, [0, 8], [0, 8]), "unknown version 'zz'"),
            (cert("a", 9, "b", 10, [0, 8], [0, 8]), "query embedding_dim 9 but version a has dim 8"),
            (cert("a", 8, "b", 10, [0, 8], [0, 11]), r"gallery_dims \[0, 11\] is not a \[start, end\)"),
            (cert("a", 8, "b", 10, [0, 8], [2, 9]), "differ in length"),
            ({"format": "something else"}, "not a bctkit-compatibility-certificate"),
        ]:
            with pytest.raises(GalleryError, match=match) as info:
                store.add_certificate(bad)
            assert "\n" not in str(info.value)
        assert store.certificates() == []
        first = cert("a", 8, "b", 10, [0, 8], [0, 8])
        store.add_certificate(first)
        second = {**cert("a", 8, "b", 10, [0, 8], [2, 10]), "sha256": "f" * 64}
        store.add_certificate(second)
        store.add_certificate(cert("b", 10, "a", 8, [0, 8], [0, 8]))
    with open_gallery(new_store()) as store:
        certs = store.certificates()
        assert [c["sha256"] for c in certs] == ["f" * 64, "b-a" * 4]
        rng = np.random.default_rng(4)
        items = rng.standard_normal((50, 10)).astype(np.float32)
        store.add([f"b{i}" for i in range(50)], items, "b")
        q = rng.standard_normal((5, 8)).astype(np.float32)
        mirror = Mirror()
        mirror.add([f"b{i}" for i in range(50)], items, "b")
        check(store.search(q, "a", 7), reference(mirror, q, "a", 7, {("a", "b"): ([0, 8], [2, 10])}))


APPROXIMATE = {"sqlite": "IVF4,Flat", "milvus-lite": "HNSW"}


def test_empty_store_and_approximate_factory(new_store, backend: str) -> None:
    with create_gallery(new_store("e")) as store:
        store.add_version("v", 8)
        res = store.search(np.ones((3, 8), np.float32), "v", 5)
        assert res.ids == [[], [], []] and res.scores.shape == (3, 0)
    rng = np.random.default_rng(5)
    with create_gallery(new_store("ivf"), index=APPROXIMATE[backend]) as store:
        store.add_version("v", 8)
        items = rng.standard_normal((400, 8)).astype(np.float32)
        store.add([f"x{i}" for i in range(400)], items, "v")
        res = store.search(items[:10], "v", 3)
        assert [row[0] for row in res.ids] == [f"x{i}" for i in range(10)]  # each item finds itself
        assert res.scores.shape == (10, 3) and np.allclose(res.scores[:, 0], 1.0, atol=1e-5)


def test_index_cache_is_read_at_its_commit_only(tmp_path: Path, monkeypatch) -> None:
    from bctkit.gallery.backends.sqlite import indexes

    monkeypatch.setattr(indexes, "CACHE_MIN_ITEMS", 0)
    rng = np.random.default_rng(6)
    items = rng.standard_normal((200, 8)).astype(np.float32)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    mirror = Mirror()
    mirror.add([f"x{i}" for i in range(200)], items, "v")
    with GalleryStore.create(tmp_path / "g") as store:
        store.add_version("v", 8)
        store.add([f"x{i}" for i in range(200)], items, "v")
        check(store.search(q, "v", 5), reference(mirror, q, "v", 5, {}))
    cached = sorted(p.name for p in (tmp_path / "g" / "indexes").glob("*.faiss"))
    assert len(cached) == 1 and cached[0].endswith("-n200.faiss")
    built = []
    original = indexes.IndexSet.build
    monkeypatch.setattr(indexes.IndexSet, "build", lambda self, *a: built.append(a[0]) or original(self, *a))
    with GalleryStore.open(tmp_path / "g") as store:
        check(store.search(q, "v", 5), reference(mirror, q, "v", 5, {}))  # read from the cache
        assert built == []
        store.add(["y"], q[:1], "v")
        mirror.add(["y"], q[:1], "v")
    with GalleryStore.open(tmp_path / "g") as store:
        check(store.search(q, "v", 5), reference(mirror, q, "v", 5, {}))  # another commit: rebuilt
        assert len(built) == 1
    cached = sorted((tmp_path / "g" / "indexes").glob("*.faiss"))
    assert len(cached) == 1 and cached[0].name.endswith("-n201.faiss")
    cached[0].write_bytes(b"garbage")
    with GalleryStore.open(tmp_path / "g") as store:
        check(store.search(q, "v", 5), reference(mirror, q, "v", 5, {}))  # unreadable: rebuilt
        assert len(built) == 2


def test_index_cache_keeps_no_file_of_an_earlier_commit(tmp_path: Path, monkeypatch) -> None:
    """Files of blocks that are never rebuilt (here the old version's, once only new queries come)
    are pruned when any block is written at a later commit."""
    from bctkit.gallery.backends.sqlite import indexes

    monkeypatch.setattr(indexes, "CACHE_MIN_ITEMS", 0)
    rng = np.random.default_rng(7)
    cache = tmp_path / "g" / "indexes"
    with GalleryStore.create(tmp_path / "g") as store:
        store.add_version("old", D_OLD)
        store.add_version("new", D_NEW)
        store.add_certificate(cert("new", D_NEW, "old", D_OLD, *DIMS[("new", "old")]))
        store.add_certificate(cert("old", D_OLD, "new", D_NEW, *DIMS[("old", "new")]))
        store.add(["a", "b"], rng.standard_normal((2, D_OLD)).astype(np.float32), "old")
        store.add(["c"], rng.standard_normal((1, D_NEW)).astype(np.float32), "new")
        store.search(rng.standard_normal((1, D_OLD)).astype(np.float32), "old", 2)
        first = sorted(p.name for p in cache.glob("*.faiss"))
        assert len(first) == 2 and len({n.split("-c")[1].split("-")[0] for n in first}) == 1
        store.replace(["a"], rng.standard_normal((1, D_NEW)).astype(np.float32), "new")
    with GalleryStore.open(tmp_path / "g") as store:
        store.search(rng.standard_normal((1, D_NEW)).astype(np.float32), "new", 2)
    later = sorted(p.name for p in cache.glob("*.faiss"))
    assert sorted(p.name for p in cache.iterdir()) == sorted(later + [n[:-5] + "json" for n in later])
    assert not set(later) & set(first) and len({n.split("-c")[1].split("-")[0] for n in later}) == 1
    assert len(later) == 2  # the new version's own block and the old items' compatible block


def test_a_cached_index_of_other_vectors_is_rebuilt_not_trusted(tmp_path: Path, monkeypatch) -> None:
    """Two stores at the same commit with the same ids and counts (the cache file names match) but
    other vectors: store b must not serve a's index, whether a's file replaces b's alone or with
    its record."""
    import shutil

    from bctkit.gallery.backends.sqlite import indexes

    monkeypatch.setattr(indexes, "CACHE_MIN_ITEMS", 0)
    rng = np.random.default_rng(8)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    mirror = Mirror()
    for name in ("a", "b"):
        items = rng.standard_normal((300, 8)).astype(np.float32)
        if name == "b":
            mirror.add([f"x{i}" for i in range(300)], items, "v")
        with GalleryStore.create(tmp_path / name) as store:
            store.add_version("v", 8)
            store.add([f"x{i}" for i in range(300)], items, "v")
            store.search(q, "v", 5)  # builds and caches the index
    (a_file,) = (tmp_path / "a" / "indexes").glob("*.faiss")
    b_file = tmp_path / "b" / "indexes" / a_file.name
    assert b_file.is_file()
    built = []
    original = indexes.IndexSet.build
    monkeypatch.setattr(indexes.IndexSet, "build", lambda self, *a: built.append(a[0]) or original(self, *a))
    for record in (False, True):
        shutil.copyfile(a_file, b_file)
        if record:
            shutil.copyfile(a_file.with_suffix(".json"), b_file.with_suffix(".json"))
        with GalleryStore.open(tmp_path / "b") as store:
            check(store.search(q, "v", 5), reference(mirror, q, "v", 5, {}))
        assert len(built) == 1 + record
    with GalleryStore.open(tmp_path / "b") as store:  # its own rebuilt index is read back
        check(store.search(q, "v", 5), reference(mirror, q, "v", 5, {}))
    assert len(built) == 2
