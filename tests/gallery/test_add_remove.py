"""``bctkit gallery add`` finished by a rerun after a SIGKILL or a failure (the same store as an
uninterrupted add), refusing what a rerun cannot skip, writing nothing when it fails before adding
anything; ``bctkit gallery remove``."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bctkit.cli import main
from bctkit.gallery import open_gallery
from bctkit.models.store import load_model
from tests.gallery.conftest import state
from tests.gallery.crash import ROOT, kill_at
from tests.gallery.test_backfill import tiny_model


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    """18 images (6 identities x 3) in tmp/gallery and a model."""
    rng = np.random.default_rng(0)
    for k in range(6):
        folder = tmp_path / "gallery" / f"p{k}"
        folder.mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(folder / f"{j}.png")
    return tmp_path, tiny_model(tmp_path / "old.safetensors", 8, 1)


def digest(store: Path) -> str:
    return hashlib.sha256((store / "gallery.sqlite").read_bytes()).hexdigest()


def add_cmd(store: Path | str, model: Path, images: Path, *extra: str) -> list[str]:
    return ["gallery", "add", str(store), "--model", str(model), "--images", str(images), "--quiet", *extra]


def contents(store: Path | str) -> tuple[list[str], list[str], np.ndarray, list[dict]]:
    with open_gallery(store) as s:
        ids = s.ids()
        vectors, versions = s.get(ids)
        return ids, versions, np.asarray(vectors), s.metadata(ids)


# kill points and the items stored after each (18 images, batches of 4: 4 4 4 4 2). SQLite: the
# version's own transaction, after a commit, holding the write lock, mid-transaction; Milvus (no
# transactions: each batch one upsert): before the first batch, after one, before the next.
KILLS = {"sqlite": (("add_version committed 1", "add committed 2", "add begin 2", "add written 1"),
                    [0, 8, 12, 12]),
         "milvus-lite": (("add begin 1", "add committed 2", "add begin 2"), [0, 8, 12])}


def test_killed_add_is_finished_by_a_rerun(world, tmp_path, backend, new_store):
    root, model = world
    ref, killed = new_store("ref"), new_store("killed")
    cli = [sys.executable, "-m", "bctkit"]
    for store in (ref, killed):
        assert main(["gallery", "create", store]) == 0
    args = add_cmd(killed, model, root / "gallery", "--batch-size", "4")  # 5 batches: 4 4 4 4 2
    assert subprocess.run(cli + add_cmd(ref, model, root / "gallery", "--batch-size", "4"), cwd=ROOT,
                          capture_output=True).returncode == 0
    fp = load_model(model).fingerprint
    counts = []
    stops, want = KILLS[backend]
    for stop in stops:
        kill_at(cli + args, stop, tmp_path / "events")
        with open_gallery(killed) as s:
            counts.append(s.versions().get(fp, {}).get("count"))
    assert counts == want
    done = subprocess.run(cli + args, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "added 6 items" in done.stdout and "12 already stored" in done.stdout
    ids_a, ver_a, vec_a, meta_a = contents(ref)
    ids_b, ver_b, vec_b, meta_b = contents(killed)
    assert ids_a == ids_b == [f"p{k}/{j}.png" for k in range(6) for j in range(3)]
    assert ver_a == ver_b == [fp] * 18 and meta_a == meta_b == [{"label": f"p{k}"} for k in range(6)
                                                                for _ in range(3)]
    np.testing.assert_allclose(vec_b, vec_a, rtol=1e-6, atol=1e-6)  # torch's kernels, same batches
    before = state(killed)
    assert main(add_cmd(killed, model, root / "gallery")) == 0  # all stored: nothing to write
    assert state(killed) == before


def test_a_rerun_refuses_items_of_another_version_or_label(world, capsys, backend, new_store):
    root, old = world
    new = tiny_model(root / "new.safetensors", 12, 2)
    store = new_store("store")
    for name, moved in (("list.txt", -1), ("moved.txt", 2)):  # moved.txt: p2's images labelled 3
        lines = [f"p{k}/{j}.png {k + (k == moved)}" for k in range(6) for j in range(3)]
        (root / "gallery" / name).write_text("\n".join(lines) + "\n")
    assert main(["gallery", "create", store, *([] if backend == "sqlite" else ["--dim", "12"])]) == 0
    assert main(add_cmd(store, old, root / "gallery" / "list.txt")) == 0
    before = state(store)
    capsys.readouterr()
    assert main(add_cmd(store, new, root / "gallery" / "list.txt")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "18 image(s) already in the store, embedded by another model version" in err
    assert main(add_cmd(store, old, root / "gallery" / "moved.txt")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "3 image(s) already in the store with another label: 'p2/0.png'" in err
    assert state(store) == before


@pytest.mark.parametrize("bad", ["corrupt first image", "no images", "batch size 0"])
def test_an_add_that_fails_before_adding_writes_nothing(world, capsys, bad, new_store):
    root, model = world
    store = new_store("store")
    assert main(["gallery", "create", store]) == 0
    images, extra = root / "gallery", []
    if bad == "corrupt first image":
        (images / "p0" / "0.png").write_bytes(b"\x89PNG not really")
    elif bad == "no images":
        images = root / "empty.txt"
        images.write_text("")
    else:
        extra = ["--batch-size", "0"]
    before = state(store)
    capsys.readouterr()
    assert main(add_cmd(store, model, images, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err
    assert state(store) == before
    with open_gallery(store) as s:
        assert s.versions() == {}


def test_remove(world, capsys, new_store):
    root, model = world
    store = new_store("store")
    assert main(["gallery", "create", store]) == 0
    assert main(add_cmd(store, model, root / "gallery")) == 0
    (root / "ids.txt").write_text("p1/0.png\r\n\np1/2.png\n")
    ids = ["p0/0.png", "p5/1.png", "--ids", str(root / "ids.txt")]
    assert main(["gallery", "remove", store, *ids]) == 0
    with open_gallery(store) as s:
        gone = {"p0/0.png", "p5/1.png", "p1/0.png", "p1/2.png"}
        assert s.ids() == [f"p{k}/{j}.png" for k in range(6) for j in range(3) if f"p{k}/{j}.png" not in gone]
        assert s.count() == 14
    before = state(store)
    (root / "latin1.txt").write_bytes(b"p2/0.png\n\xe9\n")
    for argv, message in (
            (["p2/0.png", "nope.png", "p0/0.png"], "delete: 2 unknown id(s): 'nope.png', 'p0/0.png'"),
            (["p2/0.png", "p2/0.png"], "duplicate ids within one call: 'p2/0.png'"),
            ([], "no ids given"),
            (["--ids", str(root / "missing.txt")], "missing.txt: no such file"),
            (["--ids", str(root / "latin1.txt")], "latin1.txt: not UTF-8 text")):
        capsys.readouterr()
        assert main(["gallery", "remove", store, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
    assert state(store) == before
    capsys.readouterr()
    assert main(add_cmd(store, model, root / "gallery")) == 0  # the add again: puts back what was removed
    assert "added 4 items" in capsys.readouterr().out
    with open_gallery(store) as s:
        assert sorted(s.ids()) == sorted(f"p{k}/{j}.png" for k in range(6) for j in range(3))


@pytest.mark.parametrize(("extra", "message"), [
    (["--limit", "-5"], "backfill: limit must be an integer >= 0, got -5"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
    (["--images", "MISSING"], "no image for 18 gallery item(s)"),
    (["--limit", "5"], "no passed certificate"),
    (["--limit", "5", "--order", "benefit"], "or pass --unsearchable-while-partial")])
def test_a_backfill_refused_is_one_line_and_writes_nothing(world, capsys, extra, message):
    root, old = world
    new = tiny_model(root / "new.safetensors", 12, 2)
    store = root / "store"
    assert main(["gallery", "create", str(store)]) == 0
    assert main(add_cmd(store, old, root / "gallery")) == 0
    before = digest(store)
    if "MISSING" in extra:  # another image folder: none of the items' images
        other = root / "other" / "q"
        other.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(other / "x.png")
        extra = ["--images", str(root / "other")]
    capsys.readouterr()
    argv = ["gallery", "backfill", str(store), "--model", str(new), "--images", str(root / "gallery")]
    assert main([*argv, "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert digest(store) == before
