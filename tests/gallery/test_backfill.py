"""Backfill: the order rules, partial runs, and a run SIGKILLed at random moments and restarted
ending exactly where an uninterrupted run ends (ids, versions, vectors bit for bit)."""

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bctkit.data.sources import ArraySource
from bctkit.errors import DataError
from bctkit.gallery.backends.sqlite.store import GalleryStore
from bctkit.gallery.backfill import PartialBackfillRefused, backfill, backfill_order
from bctkit.gallery.checks import GalleryError
from bctkit.gallery.forecast import expected_accuracy
from bctkit.models.config import BackboneConfig
from bctkit.models.factory import build_backbone
from bctkit.models.heads import HeadConfig
from bctkit.models.store import load_model, save_model
from tests.gallery.crash import kill_at, stopped_at
from tests.gallery.test_search import cert

N, DIM_OLD, DIM_NEW = 20_000, 8, 12
ROOT = Path(__file__).resolve().parents[2]


def tiny_model(path: Path, dim: int, seed: int) -> Path:
    torch.manual_seed(seed)
    net = build_backbone(BackboneConfig(arch="r8", width=4, embedding_dim=dim, image_size=8, in_channels=1))
    with torch.no_grad():  # eval-mode BN statistics that keep the outputs of order 1
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                m.running_var.fill_(4.0)
    meta = {"name": f"m{seed}", "preprocessing": {"color": "stored", "resize": None, "crop": None,
                                                   "mean": [0.5], "std": [0.5], "input": [1, 8, 8]}}
    save_model(path, net, None, HeadConfig(), meta)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store of N items embedded by an 'old' version (random vectors), the images they came from,
    and a new model file."""
    root = tmp_path_factory.mktemp("backfill")
    rng = np.random.default_rng(0)
    np.save(root / "images.npy", rng.integers(0, 256, (N, 1, 8, 8), dtype=np.uint8))
    new = tiny_model(root / "new.safetensors", DIM_NEW, 1)
    with GalleryStore.create(root / "base") as store:
        store.add_version("old-fp", DIM_OLD, name="old")
        scale = rng.uniform(0.5, 2.0, (N, 1)).astype(np.float32)
        old = rng.standard_normal((N, DIM_OLD)).astype(np.float32) * scale
        store.add([str(i) for i in range(N)], old, "old-fp")
    return root, new


def images(root: Path) -> ArraySource:
    arr = np.load(root / "images.npy")
    return ArraySource(arr, np.zeros(len(arr), np.int64))


def copy_store(root: Path, name: str) -> Path:
    dest = root / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(root / "base", dest)
    return dest


def state(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with GalleryStore.open(path) as store:
        ids = store.ids()
        vectors, versions = store.get(ids)
    return ids, versions, np.stack([np.asarray(v) for v in vectors])


def worker(store: Path, model: Path, root: Path) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "gallery" / "backfill_worker.py"), str(store), str(model),
            str(root / "images.npy")]


KILLS = ["replace written 2", "replace committed 1", "replace begin 4", "replace written 1",
         "replace committed 3"]
"""Where each run is killed: after 1, 1, 3, 0 and 3 more committed batches of 500."""


def test_killed_and_restarted_backfill_ends_as_an_uninterrupted_one(world, tmp_path):
    root, new_path = world
    ref = copy_store(root, "ref")
    with GalleryStore.open(ref) as store:
        res = backfill(store, load_model(new_path), images(root), order="random", seed=3, batch_size=500,
                       progress=False)
    assert (res.embedded, res.already, res.batches) == (N, 0, N // 500)
    killed = copy_store(root, "killed")
    new_fp = load_model(new_path).fingerprint
    partial = []
    for stop in KILLS:  # killed at a defined point of a batch's commit, not after a time
        kill_at(worker(killed, new_path, root), stop, tmp_path)
        with GalleryStore.open(killed) as store:  # opens after the kill, holding whole batches only
            partial.append(store.count(new_fp))
    assert partial == [500, 1000, 2500, 2500, 4000]
    done = subprocess.run(worker(killed, new_path, root), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr[-2000:]
    ids_a, ver_a, vec_a = state(ref)
    ids_b, ver_b, vec_b = state(killed)
    assert ids_a == ids_b == [str(i) for i in range(N)]
    assert ver_a == ver_b == [new_fp] * N
    assert vec_a.dtype == vec_b.dtype == np.float32 and np.array_equal(vec_a, vec_b)


def test_a_second_backfill_is_refused_while_one_runs(world, tmp_path):
    """Two backfills together would re-embed the same items twice: while one runs (stopped after its
    first commit, in another process) a second is refused, writing nothing; killed, the first
    leaves no lock behind, and the store ends with every item re-embedded exactly once."""
    root, new_path = world
    path = copy_store(root, "two")
    model = load_model(new_path)
    with stopped_at(worker(path, new_path, root), "replace committed 1", tmp_path):
        before = (path / "gallery.sqlite").read_bytes()
        with GalleryStore.open(path) as store, pytest.raises(GalleryError, match="another backfill is"):
            backfill(store, model, images(root), batch_size=5000, progress=False)
        assert (path / "gallery.sqlite").read_bytes() == before
    with GalleryStore.open(path) as store:
        assert store.count(model.fingerprint) == 500
        res = backfill(store, model, images(root), order="random", seed=3, batch_size=5000, progress=False)
        assert (res.embedded, res.already) == (N - 500, 500) and store.count(model.fingerprint) == N
    conn = sqlite3.connect(path / "gallery.sqlite")
    (embedded,) = conn.execute("SELECT sum(n) FROM segments WHERE vid IS NOT NULL AND ids IS NULL").fetchone()
    conn.close()
    assert embedded == N  # re-embeddings committed: one per item


def test_orders_and_partial_runs(world):
    root, new_path = world
    path = copy_store(root, "orders")
    model = load_model(new_path)
    with GalleryStore.open(path) as store:
        store.add_version(model.fingerprint, DIM_NEW)
        ids = store.ids()
        perm = np.random.default_rng(5).permutation(N)
        assert backfill_order(store, model.fingerprint, "random", seed=5) == [ids[i] for i in perm]
        vecs, _ = store.get(ids)
        norms = np.sqrt((np.stack(vecs).astype(np.float64) ** 2).sum(axis=1))
        by_norm = [ids[i] for i in np.argsort(norms, kind="stable")]
        assert backfill_order(store, model.fingerprint, "benefit") == by_norm
        res = backfill(store, model, images(root), order="benefit", batch_size=1000, progress=False,
                       limit=2500, unsearchable_while_partial=True)
        assert (res.embedded, res.batches) == (2500, 3)
        assert store.count(model.fingerprint) == 2500 and store.count("old-fp") == N - 2500
        assert set(store.ids(model.fingerprint)) == set(by_norm[:2500])
        assert backfill_order(store, model.fingerprint, "benefit") == by_norm[2500:]
        res = backfill(store, model, images(root), order="benefit", batch_size=1000, progress=False,
                       limit=100, unsearchable_while_partial=True)
        assert (res.embedded, res.already) == (100, 2500)


def test_an_item_without_its_image_is_named(world):
    root, new_path = world
    path = copy_store(root, "missing")
    few = ArraySource(np.load(root / "images.npy")[:10], np.zeros(10, np.int64), "few")
    with GalleryStore.open(path) as store, pytest.raises(DataError, match=r"few: no image for 19990 gallery"):
        backfill(store, load_model(new_path), few, progress=False)


def test_a_partial_backfill_without_a_passed_certificate_is_refused(world):
    """Refused before anything is embedded or written, unless allowed by keyword; a certificate new ->
    old in the store, or a limit that covers every item left, lets it run."""
    root, new_path = world
    path = copy_store(root, "partial")
    model = load_model(new_path)
    with GalleryStore.open(path) as store:
        with pytest.raises(PartialBackfillRefused) as err:
            backfill(store, model, images(root), batch_size=5000, progress=False, limit=5000)
        msg = str(err.value)
        assert "\n" not in msg and model.fingerprint in msg and "old-fp" in msg
        for remedy in ("certify", "separate store", "full backfill", "--unsearchable-while-partial"):
            assert remedy in msg
        assert isinstance(err.value, GalleryError)
        assert model.fingerprint not in store.versions() and store.count("old-fp") == N
        res = backfill(store, model, images(root), batch_size=5000, progress=False, limit=10,
                       unsearchable_while_partial=True)
        assert res.embedded == 10
        with pytest.raises(PartialBackfillRefused):
            backfill(store, model, images(root), batch_size=5000, progress=False, limit=10)
        store.add_certificate(cert(model.fingerprint, DIM_NEW, "old-fp", DIM_OLD, [0, 8], [0, 8]))
        assert backfill(store, model, images(root), batch_size=5000, progress=False, limit=10).embedded == 10
    path = copy_store(root, "full")
    with GalleryStore.open(path) as store:
        res = backfill(store, model, images(root), batch_size=5000, progress=False, limit=N)
        assert (res.embedded, store.count(model.fingerprint)) == (N, N)
        assert store.backfill_orders() == {model.fingerprint: ["random"]}


# As a run's report.json holds them: the curves by order, beside what they measure.
REPORT_CURVES = {"metric": "top1", "by": "class", "area_rule": "trapezoid over p", "seed": 0,
                 "protocol": "1:N closed-set top-1, 48 probes by bct, gallery of 12 images",
                 "random": {"fractions": [0.0, 0.5, 1.0], "values": [0.2, 0.6, 0.7], "area": 0.5},
                 "benefit": {"fractions": [0.0, 0.5, 1.0], "values": [0.3, 0.8, 0.9], "area": 0.7}}


@pytest.mark.parametrize("order, expected", [("random", "40.00 %"), ("benefit", "55.00 %")])
def test_expected_accuracy_reads_the_report_curve(world, order, expected):
    """The curve of the order the backfill used (0.2 + (0.25 / 0.5) * 0.4 for random, 0.3 + 0.5 * 0.5
    for benefit); none for an order the report has no curve of."""
    root, new_path = world
    path = copy_store(root, f"status-{order}")
    model = load_model(new_path)
    with GalleryStore.open(path) as store:
        store.add_version(model.fingerprint, DIM_NEW)
        store.add_certificate(cert(model.fingerprint, DIM_NEW, "old-fp", DIM_OLD, [0, 8], [0, 8]))
        backfill(store, model, images(root), order=order, batch_size=5000, progress=False, limit=5000)
        assert store.backfill_orders() == {model.fingerprint: [order]}
        report = {"models": {"bct": {"fingerprint": model.fingerprint}, "old": {"fingerprint": "old-fp"}},
                  "backfill": {"bct": dict(REPORT_CURVES)}}
        (line,) = expected_accuracy(store, report)
        assert "25.0 % of items backfilled" in line and expected in line and f"{order}-order" in line
        report["backfill"]["bct"].pop(order)
        (line,) = expected_accuracy(store, report)
        assert "expected top-1 of" not in line and f"no {order}-order backfill curve" in line
        other = "benefit" if order == "random" else "random"
        assert line.endswith(f"(it has {other}): no expected top-1")  # curves only, not 'metric' etc.


def test_expected_accuracy_predicts_only_allowed_searches(world):
    """After a partial backfill without a certificate the store refuses the new queries: no
    prediction for them, a line saying why."""
    root, new_path = world
    path = copy_store(root, "status-refused")
    model = load_model(new_path)
    with GalleryStore.open(path) as store:
        backfill(store, model, images(root), batch_size=5000, progress=False, limit=5000,
                 unsearchable_while_partial=True)
        report = {"models": {"bct": {"fingerprint": model.fingerprint}, "old": {"fingerprint": "old-fp"}},
                  "backfill": {"bct": dict(REPORT_CURVES)}}
        (line,) = expected_accuracy(store, report)
    assert "expected top-1 of" not in line and "refuses" in line and "bct" in line
