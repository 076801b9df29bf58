"""The server path of a distributed backfill: two torchrun ranks each upsert their own batches into
a Milvus server (a Milvus Lite file served over gRPC by another process, standing in for a real
server), the job SIGKILLed at defined points of the ranks' writes and run again: the gallery ends
bit for bit as after an uninterrupted 2-rank run."""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("milvus_lite")

from bctkit.gallery.interface import create_gallery  # noqa: E402
from tests.gallery.crash import kill_at  # noqa: E402
from tests.gallery.test_backfill import tiny_model  # noqa: E402
from tests.gallery.test_backfill_milvus import ROOT, assert_same, cmd, finish, new_count, state  # noqa: E402

N = 1200


@pytest.fixture
def server(tmp_path):
    """host:port of a Milvus Lite file served by another process."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gallery" / "lite_server.py"),
                             str(tmp_path / "server.db")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        uri = proc.stdout.readline().strip()
        assert uri.startswith("http://127.0.0.1:"), uri
        yield uri.removeprefix("http://")
    finally:
        proc.kill()
        proc.wait()


def test_ranks_writing_their_own_batches_resume_bit_for_bit(server, tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "images.npy", rng.integers(0, 256, (N, 1, 8, 8), dtype=np.uint8))
    tiny_model(tmp_path / "new.safetensors", 12, 1)
    old = rng.standard_normal((N, 8)).astype(np.float32) * rng.uniform(0.5, 2.0, (N, 1)).astype(np.float32)
    stores = {}
    for name in ("ref", "killed"):
        stores[name] = f"milvus://{server}/{name}"
        with create_gallery(stores[name], dim=12) as g:
            g.add_version("old-fp", 8, name="old")
            g.add([str(i) for i in range(N)], old, "old-fp")
    benefit = ["--order", "benefit", "--write-rows", "70"]
    out = finish(cmd(stores["ref"], tmp_path, *benefit, ranks=2)).split()
    assert out[:4] == ["finished", str(N), "0", str(N // 200)]
    seen = []
    for stop in ["replace written 2", "replace committed 1"]:  # reached by either rank, the other mid-way
        kill_at(cmd(stores["killed"], tmp_path, *benefit, ranks=2), stop, tmp_path, group=True)
        seen.append(new_count(stores["killed"]))
    assert 0 < seen[0] <= seen[1] < N
    finish(cmd(stores["killed"], tmp_path, *benefit, ranks=2))
    assert_same(state(stores["ref"]), state(stores["killed"]), N)
