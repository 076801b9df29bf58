"""``torchrun --nproc_per_node=2 -m bctkit extract`` (gloo on CPU) writes the same file, byte for
byte, as one process: each rank embeds whole batches of every chunk, rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bctkit.features import load_features
from tests.test_extract import make_folder, make_model

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not TORCHRUN.exists(),
                                reason="needs torch.distributed and torchrun")


def test_two_processes_write_the_file_of_one(tmp_path):
    model = make_model(tmp_path / "run" / "models" / "new" / "model.safetensors")
    make_folder(tmp_path / "data", per_class=5)  # 15 images: chunks of 12 (batches 2 + 1) and 3 (1 + none)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "BCTKIT_CACHE": str(tmp_path / "cache")}
    args = ["-m", "bctkit", "extract", str(model.parent), str(tmp_path / "data"), "--device", "cpu",
            "--workers", "0", "--batch-size", "4", "--chunk-batches", "3", "--flip", "--quiet", "--out"]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one.safetensors")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", *args,
                          str(tmp_path / "two.safetensors")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("extract:") == 1
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    fs = load_features(tmp_path / "two.safetensors")
    assert fs.feats.shape == (15, 8) and len(fs.keys) == 15 and fs.meta["flip"] is True
    assert not list(tmp_path.glob("*partial*"))


def test_evaluate_on_a_test_set_under_torchrun_equals_one_process(tmp_path):
    """``bctkit evaluate --protocol retrieval`` with models under torchrun: both ranks extract their
    shares, rank 0 alone writes the report, and the report equals one process's."""
    import json

    old = make_model(tmp_path / "old" / "model.safetensors")
    new = make_model(tmp_path / "new" / "model.safetensors", seed=1)
    make_folder(tmp_path / "q", per_class=2)
    make_folder(tmp_path / "g", per_class=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "BCTKIT_CACHE": str(tmp_path / "cache")}
    args = ["-m", "bctkit", "evaluate", "--protocol", "retrieval", "--data", str(tmp_path / "q"),
            str(tmp_path / "g"), "--old", str(old.parent), "--new", f"new={new.parent}", "--device", "cpu",
            "--workers", "0", "--batch-size", "4", "--topk", "1", "--quiet", "--out"]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", *args, str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("report:") == 1
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert a["results"] == b["results"] and len(a["results"]) > 0
    for name in ("old", "new"):
        assert ((tmp_path / "one" / "features" / f"{name}.safetensors").read_bytes()
                == (tmp_path / "two" / "features" / f"{name}.safetensors").read_bytes())
