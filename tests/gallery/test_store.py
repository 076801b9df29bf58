"""Gallery storage: round trips through reopen and one-line refusals that write nothing (on every
backend); the SQLite store's refused newer-format and corrupt files, and SIGKILL during a large add
leaving the old or the new state."""

import hashlib
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from bctkit.errors import BctkitError, FileFormatError
from bctkit.gallery import GalleryError, GalleryStore, create_gallery, open_gallery
from tests.gallery.conftest import state, store_string
from tests.gallery.crash import kill_at

ROOT = Path(__file__).resolve().parents[2]


def vecs(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def digest(path: Path) -> str:
    return hashlib.sha256((path / "gallery.sqlite").read_bytes()).hexdigest()


def fill(store) -> None:
    """Versions old (8-d, 5 items) and new (12-d, 0 items)."""
    store.add_version("old-fp", 8, name="old")
    store.add_version("new-fp", 12, name="new", layout={"compatible": [0, 8]})
    store.add([f"i{n}" for n in range(5)], vecs(5, 8, 0), "old-fp", [{"n": n} for n in range(5)])


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A SQLite store filled by :func:`fill`."""
    path = tmp_path / "g"
    with GalleryStore.create(path) as store:
        fill(store)
    return path


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """backend -> a closed store filled by :func:`fill`, built once and copied by :func:`store`."""
    return {}


@pytest.fixture
def store(filled: dict[str, Path], backend: str, tmp_path: Path, tmp_path_factory) -> str:
    """A store of each backend filled by :func:`fill` (its store string): a copy of one built once
    (creating a Milvus collection takes about a second)."""
    if backend not in filled:
        where = tmp_path_factory.mktemp("filled") / "g"
        with create_gallery(store_string(backend, where)) as g:
            fill(g)
        filled[backend] = where
    src = filled[backend] if backend == "sqlite" else filled[backend].with_suffix(".db")
    shutil.copytree(src, tmp_path / src.name)
    return store_string(backend, tmp_path / "g")


def test_add_replace_delete_round_trip_after_reopen(store: str) -> None:
    old, new = vecs(5, 8, 0), vecs(2, 12, 1)
    where = store
    with open_gallery(where) as store:
        store.replace(["i3", "i1"], new, "new-fp")
        store.delete(["i0"])
        store.add(["x"], vecs(1, 8, 2), "old-fp")
    with open_gallery(where) as store:
        assert store.ids() == ["i1", "i2", "i3", "i4", "x"]
        assert store.ids("new-fp") == ["i1", "i3"] and store.ids("old-fp") == ["i2", "i4", "x"]
        assert store.count() == 5 and store.count("new-fp") == 2 and store.count("old-fp") == 3
        assert store.versions() == {
            "old-fp": {"name": "old", "dim": 8, "count": 3, "layout": None},
            "new-fp": {"name": "new", "dim": 12, "count": 2, "layout": {"compatible": [0, 8]}}}
        got, versions = store.get(["i1", "i2", "i3"])
        assert versions == ["new-fp", "old-fp", "new-fp"]
        assert isinstance(got, list) and [g.dtype for g in got] == [np.float32] * 3
        assert np.array_equal(got[0], new[1]) and np.array_equal(got[1], old[2])
        assert np.array_equal(got[2], new[0])
        same, _ = store.get(["i4", "i2"])
        assert isinstance(same, np.ndarray) and np.array_equal(same, old[[4, 2]])
        assert store.metadata(["i3", "x", "i1"]) == [{"n": 3}, {}, {"n": 1}]
        assert store.find(["x", "zz", "i3"]) == ["old-fp", None, "new-fp"]


def test_scan_verify_and_backfill_orders(store: str) -> None:
    """scan: every item in insertion order, in parts of ``step``, with its version, the float64
    norm of its vector and its prior (the replaced vector's norm where the backend records priors,
    else -1); backfill orders kept per version in first-use order."""
    old, new = vecs(5, 8, 0), vecs(2, 12, 1)
    with open_gallery(store) as g:
        g.replace(["i3", "i1"], new, "new-fp")
        g.record_backfill_order("new-fp", "random")
        g.record_backfill_order("new-fp", "benefit")
        g.record_backfill_order("new-fp", "random")
        g.record_backfill_order("old-fp", "benefit")
        records = g.records_prior
    with open_gallery(store) as g:
        g.verify()
        assert g.backfill_orders() == {"new-fp": ["random", "benefit"], "old-fp": ["benefit"]}
        parts = list(g.scan(step=2))
    assert [len(p[0]) for p in parts] == [2, 2, 1]
    ids = [i for p in parts for i in p[0]]
    versions = [v for p in parts for v in p[1]]
    norms = np.concatenate([p[2] for p in parts])
    priors = np.concatenate([p[3] for p in parts])
    assert ids == [f"i{n}" for n in range(5)]
    assert versions == ["old-fp", "new-fp", "old-fp", "new-fp", "old-fp"]
    want = [np.linalg.norm(v.astype(np.float64)) for v in (old[0], new[1], old[2], new[0], old[4])]
    assert norms.dtype == np.float64 and np.allclose(norms, want, rtol=1e-6)
    replaced = np.linalg.norm(old[[1, 3]].astype(np.float64), axis=1)
    want_priors = [-1, replaced[0], -1, replaced[1], -1] if records else [-1] * 5
    assert np.allclose(priors, want_priors, rtol=1e-6)


def test_add_version_is_idempotent_and_fills_missing_fields(store: str) -> None:
    before = state(store)
    with open_gallery(store) as g:
        g.add_version("old-fp", 8, name="old")
        g.add_version("old-fp", 8)
    assert state(store) == before
    with open_gallery(store) as store:
        store.add_version("old-fp", 8, layout={"kind": "plain"})
        assert store.versions()["old-fp"]["layout"] == {"kind": "plain"}
        with pytest.raises(GalleryError, match="declared with dim 8, now 9"):
            store.add_version("old-fp", 9)
        with pytest.raises(GalleryError, match="declared with name 'old'"):
            store.add_version("old-fp", 8, name="other")


def one_line_refusal(where: str, call, match: str, error: type[BaseException] = GalleryError) -> None:
    """``call`` raises a one-line ``error`` matching ``match`` and the store is unchanged."""
    before = state(where)
    with open_gallery(where) as store, pytest.raises(error, match=match) as info:
        call(store)
    assert "\n" not in str(info.value) and isinstance(info.value, BctkitError)
    assert state(where) == before


BAD_INPUTS = [
    ("add wrong dim", lambda s: s.add(["a"], vecs(1, 12, 0), "old-fp"), r"shape \(1, 8\), got \(1, 12\)"),
    ("add wrong rows", lambda s: s.add(["a", "b"], vecs(1, 8, 0), "old-fp"), r"shape \(2, 8\)"),
    ("add nan", lambda s: s.add(["a", "b"], np.array([[0] * 8, [np.nan] * 8], np.float32), "old-fp"),
     "vector 1 contains NaN or Inf"),
    ("add inf", lambda s: s.add(["a"], np.full((1, 8), np.inf, np.float32), "old-fp"), "NaN or Inf"),
    ("add unknown version", lambda s: s.add(["a"], vecs(1, 8, 0), "nope"), "unknown version 'nope'"),
    ("add collision", lambda s: s.add(["a", "i3", "b", "i0"], vecs(4, 8, 0), "old-fp"),
     r"already in the store: 'i3', 'i0'"),
    ("add duplicate", lambda s: s.add(["a", "b", "a"], vecs(3, 8, 0), "old-fp"), "duplicate ids.*'a'"),
    ("add bad id", lambda s: s.add(["a", 3], vecs(2, 8, 0), "old-fp"), "non-empty strings"),
    ("add metadata count", lambda s: s.add(["a"], vecs(1, 8, 0), "old-fp", [{}, {}]), "2 metadata entries"),
    ("add metadata nan", lambda s: s.add(["a"], vecs(1, 8, 0), "old-fp", [{"x": float("nan")}]),
     "not JSON serialisable"),
    ("replace unknown ids", lambda s: s.replace(["i1", "zz", "yy"], vecs(3, 12, 0), "new-fp"),
     r"2 unknown id\(s\): 'zz', 'yy'"),
    ("replace duplicate", lambda s: s.replace(["i1", "i1"], vecs(2, 12, 0), "new-fp"), "duplicate ids"),
    ("replace wrong dim", lambda s: s.replace(["i1"], vecs(1, 8, 0), "new-fp"), r"shape \(1, 12\)"),
    ("replace nan", lambda s: s.replace(["i1"], np.full((1, 12), np.nan, np.float32), "new-fp"), "NaN"),
    ("replace unknown version", lambda s: s.replace(["i1"], vecs(1, 8, 0), "nope"), "unknown version"),
    ("delete unknown", lambda s: s.delete(["i1", "zz"]), r"1 unknown id\(s\): 'zz'"),
    ("delete duplicate", lambda s: s.delete(["i1", "i2", "i1"]), "duplicate ids"),
    ("get unknown", lambda s: s.get(["i1", "zz"]), "unknown id"),
    ("metadata unknown", lambda s: s.metadata(["zz"]), "unknown id"),
    ("count unknown version", lambda s: s.count("nope"), "unknown version"),
    ("version without dim", lambda s: s.add_version("v", 0), "positive integer"),
    ("certificate failed", lambda s: s.add_certificate(
        {"format": "bctkit-compatibility-certificate", "passed": False, "sha256": "ab" * 32}),
     "criterion failed"),
]


@pytest.mark.parametrize(("call", "match"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_one_line_error_and_writes_nothing(store: str, call, match: str) -> None:
    where = store
    one_line_refusal(where, call, match)
    with open_gallery(where) as store:
        assert store.ids() == [f"i{n}" for n in range(5)] and store.count("new-fp") == 0


def test_create_refuses_a_used_folder_and_a_bad_factory(tmp_path: Path, store_path: Path) -> None:
    with pytest.raises(GalleryError, match="not an empty directory"):
        GalleryStore.create(store_path)
    with pytest.raises(GalleryError, match="not a FAISS index factory"):
        GalleryStore.create(tmp_path / "bad", index="NoSuchIndex")
    assert not (tmp_path / "bad").exists()
    (tmp_path / "empty").mkdir()
    GalleryStore.create(tmp_path / "empty", index="IVF4,Flat").close()
    with GalleryStore.open(tmp_path / "empty") as store:
        assert store.index == "IVF4,Flat"


def test_newer_format_is_refused_and_left_untouched(store_path: Path) -> None:
    conn = sqlite3.connect(store_path / "gallery.sqlite")
    conn.execute("UPDATE meta SET value='7' WHERE key='format_version'")
    conn.commit()
    conn.close()
    before = digest(store_path)
    with pytest.raises(FileFormatError, match=r"written by a newer bctkit \(store format 7") as info:
        GalleryStore.open(store_path)
    assert "\n" not in str(info.value) and digest(store_path) == before


@pytest.mark.parametrize("damage", ["header", "truncate", "text", "counts", "missing", "pages"])
def test_corrupt_store_is_refused_with_one_line(store_path: Path, damage: str) -> None:
    db = store_path / "gallery.sqlite"
    data = db.read_bytes()
    if damage == "header":
        db.write_bytes(b"\x13" * 100 + data[100:])
    elif damage == "truncate":
        db.write_bytes(data[: len(data) // 2])
    elif damage == "text":
        db.write_text("not a database at all\n" * 50)
    elif damage == "pages":  # random bytes over the second page's start and the end of the file
        page = int.from_bytes(data[16:18], "big")  # SQLite header: page size, 1 meaning 65536
        page = 65536 if page == 1 else page
        noise = np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes()
        db.write_bytes(data[:page] + noise + data[page + 600 : -5000] + noise[:300] + data[-4700:])
    elif damage == "counts":
        conn = sqlite3.connect(db)
        conn.execute("UPDATE versions SET count = 4 WHERE fingerprint='old-fp'")
        conn.commit()
        conn.close()
    else:
        db.unlink()
    before = db.read_bytes() if db.exists() else None
    with pytest.raises(FileFormatError) as info:
        GalleryStore.open(store_path)
    assert "\n" not in str(info.value) and str(store_path) in str(info.value)
    assert (db.read_bytes() if db.exists() else None) == before


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from bctkit.gallery import GalleryStore
    path, round_, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    vectors = np.random.default_rng(round_).standard_normal((n, 16)).astype(np.float32)
    ids = [f"r{round_}-{i}" for i in range(n)]
    meta = [{"i": i} for i in range(n)]
    with GalleryStore.open(path) as store:
        store.add(ids, vectors, "v", meta)
""")

KILL_POINTS = [("add begin 1", "old"), ("add written 1", "old"), ("add committed 1", "new"),
               ("add written 1", "old")]


def test_sigkill_during_a_large_add_leaves_the_old_or_the_new_state(tmp_path: Path) -> None:
    """Killed once the add holds the write lock, once every row is written (pages of a 9.6 MB add
    have spilled into the file: the hot journal must undo them) and once committed."""
    n = 150_000
    path = tmp_path / "killed"
    with GalleryStore.create(path) as store:
        store.add_version("v", 16)
        store.add(["base"], np.ones((1, 16), np.float32), "v")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    expected = ["base"]
    outcomes = []
    for round_, (stop, _) in enumerate(KILL_POINTS):
        kill_at([sys.executable, str(script), str(path), str(round_), str(n)], stop, tmp_path / "ev")
        with GalleryStore.open(path) as store:
            ids = store.ids()
            if len(ids) == len(expected):
                outcomes.append("old")
            else:
                outcomes.append("new")
                expected += [f"r{round_}-{i}" for i in range(n)]
                got, _ = store.get(expected[-n:])
                want = np.random.default_rng(round_).standard_normal((n, 16)).astype(np.float32)
                assert np.array_equal(got, want)
                assert store.metadata([expected[-1]]) == [{"i": n - 1}]
            assert ids == expected and store.count() == store.count("v") == len(expected)
            assert store.search(np.ones((1, 16), np.float32), "v", 1).ids == [["base"]]
    assert outcomes == [want for _, want in KILL_POINTS]


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from bctkit.gallery import GalleryStore
    path, n = sys.argv[1], int(sys.argv[2])
    with GalleryStore.open(path) as store:
        print("ready", flush=True)
        for r in range(10_000):
            vec = np.random.default_rng(r).standard_normal((n, 8)).astype(np.float32)
            store.add([f"w{r}-{i}" for i in range(n)], vec, "old-fp")
""")


def test_open_while_another_process_commits_never_sees_a_truncated_file(store_path: Path) -> None:
    """The open's length check runs under SQLite's shared lock, so a commit growing the file in
    another process is never mistaken for a truncated copy."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(store_path), "20000"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        counts = []
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline and proc.poll() is None:
            with GalleryStore.open(store_path) as store:
                counts.append(store.count("old-fp"))
    finally:
        proc.kill()
        proc.wait()
    grown = sorted(set(counts))
    assert len(grown) >= 3 and all((c - 5) % 20000 == 0 for c in grown)  # whole commits only


def test_a_stored_vector_damaged_on_disk_is_named_not_searched_as_an_empty_place(tmp_path: Path,
                                                                                  capsys) -> None:
    """16 bytes of one item's stored vector overwritten (NaN): status, get and search name the item
    (status exits 2 with one line) instead of reporting OK and dropping it from results."""
    from bctkit.cli import main

    path = tmp_path / "g"
    items = vecs(300, 8, 4)
    with GalleryStore.create(path) as store:
        store.add_version("v", 8)
        store.add([f"x{i}" for i in range(300)], items, "v")
    db = path / "gallery.sqlite"
    data = db.read_bytes()
    at = data.index(items[123].tobytes())
    assert data.count(items[123].tobytes()) == 1
    damaged = data[:at + 8] + np.full(4, np.nan, np.float32).tobytes() + data[at + 24:]
    db.write_bytes(damaged)
    capsys.readouterr()
    assert main(["gallery", "status", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "1 damaged item(s): vectors holding NaN or Inf: 'x123'" in err
    with GalleryStore.open(path) as store:
        for call in (lambda: store.search(items[:2], "v", 5), lambda: store.get(["x1", "x123"]),
                     store.verify):
            with pytest.raises(FileFormatError, match="damaged item.*'x123'") as info:
                call()
            assert "\n" not in str(info.value)
        assert store.get(["x1", "x122"])[0].shape == (2, 8)  # the other items stay readable
    assert db.read_bytes() == damaged  # nothing written
