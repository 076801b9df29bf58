"""The store's segment format read from files built in the test from its description, a format-1
store refused, and two processes racing to add overlapping ids (one wins, the other is refused)."""

import hashlib
import json
import re
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bctkit.errors import FileFormatError
from bctkit.gallery import GalleryError, GalleryStore

ROOT = Path(__file__).resolve().parents[2]
FORMAT_2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE versions (vid INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE, name TEXT,
                       dim INTEGER NOT NULL, layout TEXT, count INTEGER NOT NULL DEFAULT 0);
CREATE TABLE segments (seg INTEGER PRIMARY KEY, vid INTEGER, n INTEGER NOT NULL, first_key INTEGER,
                       keys BLOB, ids BLOB, id_offsets BLOB, meta TEXT, vec BLOB);
CREATE TABLE certificates (seq INTEGER PRIMARY KEY, query_vid INTEGER NOT NULL,
                           gallery_vid INTEGER NOT NULL, sha256 TEXT NOT NULL, body TEXT NOT NULL,
                           UNIQUE (query_vid, gallery_vid));
"""
ITEMS_1 = ("CREATE TABLE items (key INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, vid INTEGER NOT NULL, "
           "meta TEXT, vec BLOB NOT NULL);")
FORMAT_1 = re.sub(r"CREATE TABLE segments \(.*?\);", ITEMS_1, FORMAT_2, flags=re.S)


def handmade(path: Path, version: int = 2, schema: str = FORMAT_2) -> sqlite3.Connection:
    """An empty store written with sqlite3 alone, as the format describes it."""
    path.mkdir()
    conn = sqlite3.connect(path / "gallery.sqlite")
    conn.executescript(schema)
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [
        ("format", "bctkit-gallery"), ("format_version", str(version)), ("index", "Flat"), ("commit", "3"),
        ("next_key", "4")])
    return conn


def id_blobs(ids: list[str]) -> tuple[bytes, bytes]:
    """UTF-8 bytes concatenated and n + 1 little-endian int64 byte offsets, one id at a time."""
    data, offsets = b"", [0]
    for i in ids:
        data += i.encode("utf-8")
        offsets.append(len(data))
    return data, b"".join(o.to_bytes(8, "little", signed=True) for o in offsets)


def test_a_store_written_from_the_format_description_reads_back(tmp_path: Path) -> None:
    """Two add segments (consecutive keys: first_key only), a replace of key 0 into another
    version (keys blob), a tombstone of key 2; non-ASCII ids; metadata in one add only."""
    path = tmp_path / "g"
    conn = handmade(path)
    conn.executemany("INSERT INTO versions (vid, fingerprint, name, dim, count) VALUES (?, ?, ?, ?, ?)",
                     [(1, "v2d", "two", 2, 1), (2, "v3d", "three", 3, 2)])
    vec = [[1.0, 0.5], [-2.0, 0.25], [0.0, 3.0]]
    ids, offsets = id_blobs(["alpha", "bêta", "γ"])
    conn.execute("INSERT INTO segments (seg, vid, n, first_key, ids, id_offsets, meta, vec) "
                 "VALUES (1, 1, 3, 0, ?, ?, ?, ?)", (ids, offsets, json.dumps([{"a": 1}, {}, {"c": [3]}]),
                                                     np.array(vec, "<f4").tobytes()))
    ids, offsets = id_blobs(["δ"])
    conn.execute("INSERT INTO segments (seg, vid, n, first_key, ids, id_offsets, vec) "
                 "VALUES (2, 2, 1, 3, ?, ?, ?)", (ids, offsets, np.array([[7, 8, 9]], "<f4").tobytes()))
    conn.execute("INSERT INTO segments (seg, vid, n, keys, vec) VALUES (3, 2, 1, ?, ?)",
                 ((0).to_bytes(8, "little"), np.array([[4, 5, 6]], "<f4").tobytes()))
    conn.execute("INSERT INTO segments (seg, vid, n, keys) VALUES (4, NULL, 1, ?)",
                 ((2).to_bytes(8, "little"),))
    conn.commit()
    conn.close()
    with GalleryStore.open(path) as store:
        assert store.ids() == ["alpha", "bêta", "δ"]
        assert store.ids("v3d") == ["alpha", "δ"] and store.count("v2d") == 1 and store.count() == 3
        got, versions = store.get(["δ", "alpha"])
        assert versions == ["v3d", "v3d"] and np.array_equal(got, [[7, 8, 9], [4, 5, 6]])
        got, versions = store.get(["bêta", "alpha"])
        assert versions == ["v2d", "v3d"] and [g.tolist() for g in got] == [[-2.0, 0.25], [4, 5, 6]]
        assert store.metadata(["alpha", "δ", "bêta"]) == [{"a": 1}, {}, {}]
        with pytest.raises(GalleryError, match=r"1 unknown id\(s\): 'γ'"):
            store.get(["γ"])
        store.add(["γ"], np.ones((1, 2), np.float32), "v2d")  # a deleted id may come back
        assert store.ids() == ["alpha", "bêta", "δ", "γ"] and store.count("v2d") == 2


@pytest.mark.parametrize("damage", ["vector length", "offsets", "count"])
def test_a_segment_contradicting_itself_is_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "g"
    conn = handmade(path)
    conn.execute("INSERT INTO versions (vid, fingerprint, dim, count) VALUES (1, 'v', 2, ?)",
                 (1 if damage == "count" else 2,))
    ids, offsets = id_blobs(["a", "b"])
    if damage == "offsets":
        offsets = offsets[:8] + (5).to_bytes(8, "little") + offsets[16:]
    vec = np.zeros((2, 2), "<f4").tobytes()
    conn.execute("INSERT INTO segments (vid, n, first_key, ids, id_offsets, vec) VALUES (1, 2, 0, ?, ?, ?)",
                 (ids, offsets, vec[:-4] if damage == "vector length" else vec))
    conn.commit()
    conn.close()
    before = (path / "gallery.sqlite").read_bytes()
    with pytest.raises(FileFormatError, match="corrupt gallery store") as info:
        GalleryStore.open(path)
    assert "\n" not in str(info.value) and (path / "gallery.sqlite").read_bytes() == before


def test_a_format_1_store_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "old"
    conn = handmade(path, version=1, schema=FORMAT_1)
    conn.commit()
    conn.close()
    assert "items" in FORMAT_1 and "segments" not in FORMAT_1
    before = hashlib.sha256((path / "gallery.sqlite").read_bytes()).hexdigest()
    with pytest.raises(FileFormatError, match=r"written by an older bctkit store format 1; this bctkit reads "
                                              r"store format 2") as info:
        GalleryStore.open(path)
    assert "\n" not in str(info.value)
    assert hashlib.sha256((path / "gallery.sqlite").read_bytes()).hexdigest() == before


RACER = textwrap.dedent("""
    import sys
    import numpy as np
    from bctkit.gallery import GalleryError, GalleryStore
    path, name = sys.argv[1], sys.argv[2]
    ids = [f"{name}{i}" for i in range(90_000)] + [f"s{i}" for i in range(10_000)]
    if name == "b":
        ids = ids[90_000:] + ids[:90_000]
    vectors = np.random.default_rng(ord(name)).standard_normal((len(ids), 16)).astype(np.float32)
    with GalleryStore.open(path) as store:
        print("ready", flush=True)
        sys.stdin.readline()
        try:
            store.add(ids, vectors, "v")
        except GalleryError as exc:
            print("refused", exc, flush=True)
        else:
            print("added", flush=True)
""")


def test_two_processes_adding_overlapping_ids_one_wins(tmp_path: Path) -> None:
    """Both open the store (their views empty), then add 100k ids each, 10k of them the same:
    the second to take the write lock sees the first's commit and is refused as a whole."""
    path = tmp_path / "race"
    with GalleryStore.create(path) as store:
        store.add_version("v", 16)
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(path), name], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for name in "ab"]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(o.split()[0] for o in outs) == ["added", "refused"], outs
    winner = "ab"[[o.split()[0] for o in outs].index("added")]
    (refusal,) = [o for o in outs if o.startswith("refused")]
    assert "\n" not in refusal
    assert refusal.endswith("add: id(s) already in the store: 's0', 's1', 's2' (and 9997 more)")
    want = [f"{winner}{i}" for i in range(90_000)] + [f"s{i}" for i in range(10_000)]
    if winner == "b":
        want = want[90_000:] + want[:90_000]
    with GalleryStore.open(path) as store:
        got = store.ids()
        assert got == want and len(set(got)) == len(got) == store.count("v") == 100_000
        vectors, _ = store.get(want[-3:])
        expected = np.random.default_rng(ord(winner)).standard_normal((100_000, 16)).astype(np.float32)
        assert np.array_equal(vectors, expected[-3:])
