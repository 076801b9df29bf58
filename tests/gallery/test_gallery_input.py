"""``bctkit gallery`` under bad input: images that do not fit the model, bad counts, a report that is
not a run's report, certificates that are refused and a full disk, each refused on one line (exit 2)
before anything is written."""

import errno
import json
import math
import os
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image

from bctkit.cli import main
from bctkit.data.sources import ImageFolderSource
from bctkit.errors import BctkitError, ConfigError, DataError
from bctkit.evaluation.certificate import make_certificate, write_certificate
from bctkit.features import FeatureSet
from bctkit.gallery import embed as embed_module
from bctkit.gallery import open_gallery
from bctkit.gallery.backends.sqlite import store as store_module
from bctkit.gallery.backends.sqlite.store import GalleryStore
from bctkit.gallery.backfill import backfill
from bctkit.gallery.embed import embed_all, open_embedder
from bctkit.models.store import load_model
from tests.gallery.conftest import state
from tests.gallery.test_backfill import tiny_model


def _images(folder, size, mode, seed):
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for k in range(2):
        (folder / f"p{k}").mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"p{k}/{j}.png")
    return folder


def _certificate(path, new_fp, old_fp, cross):
    labels = torch.arange(4)
    q = FeatureSet(torch.randn(4, 12), labels, {"model_fingerprint": new_fp, "compat_dims": 8})
    g = FeatureSet(torch.randn(4, 8), labels, {"model_fingerprint": old_fp})
    metrics = {"top1": {"cross": cross, "old_self": 0.5, "self": 0.7, "criterion": cross > 0.5,
                        "update_gain": 0.5}}
    write_certificate(path, make_certificate("new", q, "old", g, metrics, {"dataset": "t"}))
    return path


@pytest.fixture
def world(tmp_path):
    """Grey 8 x 8 images (what the tiny models take), grey 64 x 64 and colour 8 x 8 ones with the
    same keys, an old (8-d) and a new (12-d) model, a passed and a failed certificate new -> old."""
    grey = _images(tmp_path / "grey8", 8, "L", 0)
    big = _images(tmp_path / "grey64", 64, "L", 1)
    rgb = _images(tmp_path / "rgb8", 8, "RGB", 2)
    old = tiny_model(tmp_path / "old.safetensors", 8, 1)
    new = tiny_model(tmp_path / "new.safetensors", 12, 2)
    fp_old, fp_new = load_model(old).fingerprint, load_model(new).fingerprint
    good = _certificate(tmp_path / "good.json", fp_new, fp_old, 0.6)
    failed = _certificate(tmp_path / "failed.json", fp_new, fp_old, 0.4)
    return {"root": tmp_path, "grey": grey, "big": big, "rgb": rgb, "old": old, "new": new,
            "fp_old": fp_old, "fp_new": fp_new, "good": good, "failed": failed}


def _error(capsys) -> str:
    """The one line a refused command printed (and nothing else)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _versions(store) -> dict:
    with open_gallery(store) as s:
        return s.versions()


def _create(store: str, backend: str) -> None:
    """Create a store that takes both models (a Milvus collection is created 12-d)."""
    assert main(["gallery", "create", store, *([] if backend == "sqlite" else ["--dim", "12"])]) == 0


@pytest.mark.parametrize("images, got", [("big", "1x64x64"), ("rgb", "3x8x8")])
def test_images_that_do_not_fit_the_model_are_refused_on_one_line(world, capsys, images, got):
    """add and search: the image, what it is through the model's preprocessing and what the model
    takes; a refused search declares nothing."""
    store = str(world["root"] / "s")
    assert main(["gallery", "create", store]) == 0
    folder = world[images]
    capsys.readouterr()
    add = ["gallery", "add", store, "--model", str(world["old"]), "--quiet", "--images"]
    assert main([*add, str(folder)]) == 2
    err = _error(capsys)
    assert str(folder / "p0" / "0.png") in err and got in err and "1x8x8" in err
    assert main([*add, str(world["grey"])]) == 0
    before = _versions(store)
    capsys.readouterr()
    assert main(["gallery", "search", store, "--model", str(world["new"]), "--images", str(folder),
                 "--quiet"]) == 2
    err = _error(capsys)
    assert str(folder / "p0" / "0.png") in err and got in err and "1x8x8" in err
    assert _versions(store) == before


def test_library_embedding_and_backfill_raise_a_typed_error(world):
    model = open_embedder(world["old"])
    with pytest.raises(DataError, match=r"takes 1x8x8.*grey64/p0/0\.png.* is 1x64x64"):
        embed_all(model, ImageFolderSource(world["big"]), progress=False)
    with pytest.raises(ConfigError, match="batch size must be >= 1"):
        embed_all(model, ImageFolderSource(world["grey"]), batch_size=0, progress=False)
    with GalleryStore.create(world["root"] / "s") as store:
        store.add_version(world["fp_old"], 8)
        store.add([f"p{k}/{j}.png" for k in range(2) for j in range(2)], np.ones((4, 8)), world["fp_old"])
        with pytest.raises(DataError, match=r"takes 1x8x8.*grey64/p\d/\d\.png.* is 1x64x64"):
            backfill(store, open_embedder(world["new"]), ImageFolderSource(world["big"]), progress=False)
        assert store.count(world["fp_old"]) == 4


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["-k", "0"], ["-k", "-3"]])
def test_search_counts_must_be_positive(world, capsys, option):
    """Refused when the arguments are read, before the store, the model or the images are opened."""
    assert main(["gallery", "search", str(world["root"] / "nowhere"), "--model", str(world["new"]),
                 "--images", str(world["grey"]), *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, as every bctkit error (no argparse usage block)
    assert f"argument {option[0]}: must be a positive integer, got {option[1]!r}" in err[0]


@pytest.mark.parametrize("content, expected", [
    ("[1, 2]", "a JSON array"),
    ('{"models": []}', "'models' must be an object"),
    ('{"models": {"m": {"fingerprint": "x"}}, "results": [], "backfill": {"m": {"random": '
     '{"fractions": [0, 1], "values": "high"}}}}', "'backfill.m.random'"),
])
def test_status_report_must_be_a_run_report(world, capsys, content, expected):
    store = str(world["root"] / "s")
    assert main(["gallery", "create", store]) == 0
    report = world["root"] / "report.json"
    report.write_text(content)
    capsys.readouterr()
    assert main(["gallery", "status", store, "--report", str(report)]) == 2
    err = _error(capsys)
    assert str(report) in err and "report.json" in err and expected in err


def test_certify_refuses_a_failed_certificate_before_declaring_anything(world, capsys, backend, new_store):
    store = new_store("s")
    _create(store, backend)
    capsys.readouterr()
    assert main(["gallery", "certify", store, str(world["failed"])]) == 2
    assert "criterion failed" in _error(capsys)
    assert _versions(store) == {}


@pytest.mark.parametrize("second", ["garbage", "nan", "failed", "other_dim"])
def test_certify_verifies_every_file_before_storing_any(world, capsys, second, backend, new_store):
    """A bad second certificate (unreadable, NaN, failed, or at odds with the first's dims) leaves
    the store as it was: the first is not stored, no version declared."""
    root = world["root"]
    store = new_store("s")
    _create(store, backend)
    bad = root / "second.json"
    cert = json.loads(world["good"].read_text())
    if second == "garbage":
        bad.write_text("{not json")
    elif second == "nan":
        cert["metrics"]["top1"]["self"] = math.nan
        bad.write_text(json.dumps(cert))
    elif second == "failed":
        bad = world["failed"]
    else:  # the old fingerprint claimed with another embedding size
        labels = torch.arange(4)
        q = FeatureSet(torch.randn(4, 16), labels, {"model_fingerprint": "fp-v3", "compat_dims": 4})
        g = FeatureSet(torch.randn(4, 4), labels, {"model_fingerprint": world["fp_old"]})
        metrics = {"top1": {"cross": 0.6, "old_self": 0.5, "self": 0.7, "criterion": True,
                            "update_gain": 0.5}}
        write_certificate(bad, make_certificate("v3", q, "old", g, metrics, {"dataset": "t"}))
    capsys.readouterr()
    assert main(["gallery", "certify", store, str(world["good"]), str(bad)]) == 2
    assert str(bad) in _error(capsys)
    with open_gallery(store) as s:
        assert s.versions() == {} and s.certificates() == []
    assert main(["gallery", "certify", store, str(world["good"])]) == 0
    with open_gallery(store) as s:
        assert set(s.versions()) == {world["fp_old"], world["fp_new"]} and len(s.certificates()) == 1


def test_a_refused_search_declares_nothing_and_embeds_nothing(world, capsys, monkeypatch, backend,
                                                              new_store):
    store = new_store("s")
    _create(store, backend)
    assert main(["gallery", "add", store, "--model", str(world["old"]), "--images", str(world["grey"]),
                 "--quiet"]) == 0
    before = state(store)

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded queries of a search that is refused")

    monkeypatch.setattr(embed_module, "iter_features", no_embedding)
    capsys.readouterr()
    assert main(["gallery", "search", store, "--model", str(world["new"]), "--images", str(world["grey"]),
                 "--quiet"]) == 2
    err = _error(capsys)
    assert "certificate" in err and world["fp_new"] in err and world["fp_old"] in err
    assert state(store) == before
    monkeypatch.undo()
    assert main(["gallery", "certify", store, str(world["good"])]) == 0
    assert main(["gallery", "search", store, "--model", str(world["new"]), "--images", str(world["grey"]),
                 "--quiet", "-k", "2"]) == 0


def test_after_a_partial_backfill_without_certificate_neither_model_searches_nor_embeds(world, capsys,
                                                                                        monkeypatch):
    """The case of issue 27: a partial backfill allowed without a certificate leaves a store neither
    model may search; both are refused before any query is embedded, naming the other version."""
    root = world["root"]
    store = str(root / "s")
    assert main(["gallery", "create", store]) == 0
    common = ["--images", str(world["grey"]), "--quiet"]
    assert main(["gallery", "add", store, "--model", str(world["old"]), *common]) == 0
    assert main(["gallery", "backfill", store, "--model", str(world["new"]), *common, "--limit", "2",
                 "--unsearchable-while-partial"]) == 0
    before = _versions(store)
    assert [v["count"] for v in before.values()] == [2, 2]

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded queries of a search that is refused")

    monkeypatch.setattr(embed_module, "iter_features", no_embedding)
    capsys.readouterr()
    for model, other in (("new", "fp_old"), ("old", "fp_new")):
        assert main(["gallery", "search", store, "--model", str(world[model]), *common]) == 2
        err = _error(capsys)
        assert "certificate" in err and world[f"fp_{model}"] in err and world[other] in err
    assert _versions(store) == before


def _full_disk_sqlite(monkeypatch):
    """SQLite runs out of room (SQLITE_FULL) as on a full disk: the database may hold one page."""
    real = store_module.connect

    def connect(path, mode):
        conn = real(path, mode)
        conn.execute("PRAGMA max_page_count=1")
        return conn

    monkeypatch.setattr(store_module, "connect", connect)


def _full_disk_rename(monkeypatch):
    def rename(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module.os, "rename", rename)


@pytest.mark.parametrize("inject", [_full_disk_sqlite, _full_disk_rename])
def test_create_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, inject):
    inject(monkeypatch)
    target = tmp_path / "stores" / "s"
    with pytest.raises(BctkitError) as exc:
        GalleryStore.create(target)
    assert str(target) in str(exc.value) and "no space left" in str(exc.value).lower()
    assert "\n" not in str(exc.value)
    assert list((tmp_path / "stores").iterdir()) == []
    assert main(["gallery", "create", str(target)]) == 2
    err = _error(capsys)
    assert str(target) in err and "no space left" in err.lower()
    assert list((tmp_path / "stores").iterdir()) == []


def test_sqlite_full_error_is_what_the_injection_gives(tmp_path):
    """The SQLite injection above is SQLite's own disk-full error, not a made-up one."""
    conn = sqlite3.connect(tmp_path / "x.sqlite")
    conn.execute("PRAGMA max_page_count=1")
    with pytest.raises(sqlite3.OperationalError) as exc:
        conn.execute("CREATE TABLE t (a)")
        conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
    assert exc.value.sqlite_errorcode == sqlite3.SQLITE_FULL
    conn.close()
