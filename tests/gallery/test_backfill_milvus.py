"""Backfill on Milvus Lite killed at defined points (single process, and 2-process torchrun with
rank 0 writing), then restarted: the store ends bit for bit as after an uninterrupted run (ids,
versions, vectors and the priors the plan is rebuilt from). The server path, every rank writing its
own batches: test_backfill_server.py."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("milvus_lite")

from bctkit.gallery.interface import create_gallery, open_gallery  # noqa: E402
from tests.gallery.crash import kill_at  # noqa: E402
from tests.gallery.test_backfill import tiny_model  # noqa: E402

N = 2000
ROOT = Path(__file__).resolve().parents[2]
WORKER = str(ROOT / "tests" / "gallery" / "dist_backfill_worker.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A Milvus Lite gallery of N 8-d 'old' items (room for 12-d), their images, a new 12-d model."""
    root = tmp_path_factory.mktemp("mbackfill")
    rng = np.random.default_rng(0)
    np.save(root / "images.npy", rng.integers(0, 256, (N, 1, 8, 8), dtype=np.uint8))
    tiny_model(root / "new.safetensors", 12, 1)
    with create_gallery(f"milvus-lite:{root / 'base.db'}", dim=12) as g:
        g.add_version("old-fp", 8, name="old")
        scale = rng.uniform(0.5, 2.0, (N, 1)).astype(np.float32)
        g.add([str(i) for i in range(N)], rng.standard_normal((N, 8)).astype(np.float32) * scale, "old-fp")
    return root


def copy(root: Path, name: str) -> str:
    shutil.rmtree(root / f"{name}.db", ignore_errors=True)
    shutil.copytree(root / "base.db", root / f"{name}.db")
    return f"milvus-lite:{root / name}.db"


def cmd(store: str, root: Path, *extra: str, ranks: int = 1) -> list[str]:
    head = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}"] if ranks > 1 \
        else [sys.executable]
    return [*head, WORKER, store, str(root / "new.safetensors"), str(root / "images.npy"), *extra]


def finish(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def state(store: str) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    with open_gallery(store) as g:
        ids = g.ids()
        vectors, versions = g.get(ids)
        priors = np.concatenate([p for *_, p in g.scan()])
    return ids, versions, np.stack([np.asarray(v) for v in vectors]), priors


def new_count(store: str) -> int:
    with open_gallery(store) as g:
        return sum(info["count"] for fp, info in g.versions().items() if fp != "old-fp")


def assert_same(a: tuple, b: tuple, n: int = N) -> None:
    assert a[0] == b[0] == [str(i) for i in range(n)]
    assert a[1] == b[1] and len(set(a[1])) == 1 and a[1][0] != "old-fp"
    assert a[2].dtype == b[2].dtype == np.float32 and np.array_equal(a[2], b[2])
    assert np.array_equal(a[3], b[3]) and (a[3] > 0).all()


def test_killed_backfill_resumes_bit_for_bit(world, tmp_path):
    """Benefit order (the plan leans on the recorded priors), batches of 200 written in upserts of
    70 rows: kills between two upserts of one batch leave half a batch, which the restart redoes."""
    ref = copy(world, "ref")
    assert finish(cmd(ref, world, "--order", "benefit")).split()[:4] == ["finished", str(N), "0", "10"]
    killed = copy(world, "killed")
    seen = []
    for stop in ["replace written 2", "replace committed 1", "replace written 1"]:
        kill_at(cmd(killed, world, "--order", "benefit", "--write-rows", "70"), stop, tmp_path)
        seen.append(new_count(killed))
    assert seen[0] == 200 + 70 and seen == sorted(seen) and seen[-1] < N
    finish(cmd(killed, world, "--order", "benefit", "--write-rows", "70"))
    assert_same(state(ref), state(killed))


def test_killed_torchrun_backfill_resumes_bit_for_bit(world, tmp_path):
    """2 ranks, rank 0 writing (Milvus Lite admits one process): the whole job killed at points of
    rank 0's writes, then run again with 2 ranks."""
    ref = copy(world, "tref")
    assert finish(cmd(ref, world, ranks=2)).split()[:4] == ["finished", str(N), "0", "10"]
    killed = copy(world, "tkilled")
    for stop in ["replace written 3", "replace committed 2"]:
        kill_at(cmd(killed, world, "--write-rows", "70", ranks=2), stop, tmp_path, group=True)
    assert 0 < new_count(killed) < N
    finish(cmd(killed, world, "--write-rows", "70", ranks=2))
    assert_same(state(ref), state(killed))
