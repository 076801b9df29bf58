"""``torchrun -m bctkit gallery backfill`` on the SQLite store: two ranks embed, rank 0 writes, and
the store ends as a single-process backfill leaves it; a rank that fails on its own batch (a
corrupt image only it reads) stops both ranks with its error instead of leaving the other waiting."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bctkit.gallery.interface import open_gallery
from tests.gallery.test_backfill import tiny_model

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "bctkit"]


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(5):
        folder = tmp_path / "gallery" / f"p{k}"
        folder.mkdir(parents=True)
        for j in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(folder / f"{j}.png")
    old = tiny_model(tmp_path / "old.safetensors", 8, 1)
    new = tiny_model(tmp_path / "new.safetensors", 12, 2)
    return tmp_path, old, new


def bctkit(args: list[str], ranks: int = 1) -> subprocess.CompletedProcess:
    cmd = (TORCHRUN if ranks > 1 else [sys.executable, "-m", "bctkit"]) + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun gives each rank, for both runs
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def store_of(root, name: str, old) -> str:
    """A SQLite store of the folder's images embedded by ``old`` (built in this process)."""
    from bctkit.data.datasets import open_dataset
    from bctkit.gallery.embed import open_embedder
    from bctkit.gallery.ingest import add_images
    from bctkit.gallery.interface import create_gallery

    store = str(root / name)
    with create_gallery(store) as g:
        add_images(g, open_embedder(old), open_dataset(str(root / "gallery")), progress=False)
    return store


def test_two_ranks_end_as_one(setup):
    root, old, new = setup
    one, two = store_of(root, "one", old), store_of(root, "two", old)
    backfill = ["--model", str(new), "--images", str(root / "gallery"), "--batch-size", "3", "--quiet",
                "--device", "cpu", "--order", "benefit"]
    a = bctkit(["gallery", "backfill", one, *backfill])
    b = bctkit(["gallery", "backfill", two, *backfill], ranks=2)
    assert a.returncode == 0 and b.returncode == 0, b.stderr[-2000:]
    assert "backfilled 20 items in 7 batches" in a.stdout and "backfilled 20 items in 7 batches" in b.stdout
    assert b.stdout.count("gallery: backfilled") == 1  # rank 0 prints
    with open_gallery(one) as s1, open_gallery(two) as s2:
        ids = s1.ids()
        assert ids == s2.ids() and len(ids) == 20
        v1, ver1 = s1.get(ids)
        v2, ver2 = s2.get(ids)
    assert ver1 == ver2 and len(set(ver1)) == 1
    # same batches, one thread each: the ranks' kernels differ from one process's only if the
    # library picks another algorithm per process, so a float32 rounding bound, not equality
    assert np.allclose(v1, v2, rtol=0, atol=1e-6)


def test_a_failing_rank_stops_both(setup):
    root, old, new = setup
    store = store_of(root, "s", old)
    # batches of 3 in random order (seed 0): corrupt an image of a batch rank 1 embeds
    from bctkit.gallery.backfill_plan import plan_backfill

    with open_gallery(store) as s:
        batches = plan_backfill(s, "new-version", "random", 0, 3).batches
    victim = batches[1][0]
    (root / "gallery" / victim).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    done = bctkit(["gallery", "backfill", store, "--model", str(new), "--images", str(root / "gallery"),
                   "--batch-size", "3", "--quiet", "--device", "cpu"], ranks=2)
    assert done.returncode != 0
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("bctkit: error:")]
    assert any(victim in ln and "rank 1" in ln for ln in errors), done.stderr[-3000:]
    assert any("rank 0" in ln and "another rank failed" in ln for ln in errors), done.stderr[-3000:]
