"""End to end on datasets from disk: the same images as an image folder, a list file and an
insightface RecordIO pair give the same labels, pixels and results; a run killed mid-epoch and
resumed ends with the weights of an uninterrupted one; bad input stops before training."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bctkit.cli import main
from bctkit.data.sources import ImageFolderSource, ListSource, RecordIOSource
from bctkit.data.sources.recordio_writer import write_insightface
from bctkit.models.store import load_model
from bctkit.run.config import load_config
from bctkit.run.launch import run_pipeline
from tests.data.sources.conftest import encoded_images, write_folder

IDS, PER = 14, 6


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """One set of encoded PNG/JPEG images in the three layouts, in the same order."""
    root = tmp_path_factory.mktemp("formats")
    items = encoded_images(IDS, PER, size=(16, 16), seed=4)
    folder = write_folder(root / "folder", items)
    src = ImageFolderSource(folder)
    lines = [f"folder/{src.key(i)} {src.labels[i]}" for i in range(len(src))]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    by_key = {f"id{label:02d}/{name}": data for label, name, data in items}
    write_insightface(root / "rec", [(by_key[src.key(i)], int(src.labels[i])) for i in range(len(src))])
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BCTKIT_CACHE", str(tmp_path_factory.mktemp("cache")))


def test_three_formats_give_the_same_images(formats):
    folder = ImageFolderSource(formats / "folder")
    listed = ListSource(formats / "train.txt")
    rec = RecordIOSource(formats / "rec")
    assert len(folder) == len(listed) == len(rec) == IDS * PER
    assert np.array_equal(folder.labels, listed.labels) and np.array_equal(folder.labels, rec.labels)
    for i in range(len(folder)):
        assert np.array_equal(folder.decode(i), listed.decode(i))
        assert np.array_equal(folder.decode(i), rec.decode(i))


def tree(section: dict, workers: int = 0, **data) -> dict:
    backbone = {"arch": "r8", "width": 4, "embedding_dim": 8, "image_size": 16, "in_channels": 3}
    return {
        "data": {**section, "eval_classes": 4, "eval_images_per_class": 4, "num_workers": workers,
                 "transform": {"color": "rgb"}, **data},
        "old": {"backbone": dict(backbone),
                "train": {"epochs": 2, "batch_size": 16, "schedule": {"name": "constant"}}},
        "new": {"backbone": dict(backbone),
                "train": {"epochs": 2, "batch_size": 16, "schedule": {"name": "constant"}}},
        "methods": [{"method": "l2"}],
        "evaluation": {"fars": [0.1], "topk": [1], "backfill": False},
    }


def sections(formats: Path) -> dict[str, dict]:
    return {
        "imagefolder": {"dataset": "imagefolder", "imagefolder": {"root": str(formats / "folder")}},
        "list": {"dataset": "list", "list": {"file": str(formats / "train.txt")}},
        "recordio": {"dataset": "recordio", "recordio": {"path": str(formats / "rec")}},
    }


def _run(tmp_path, name, t):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(t))
    return run_pipeline(load_config(path), tmp_path / name, progress=False, log=lambda _m: None)


def test_bctkit_run_on_each_format(formats, tmp_path):
    reports = {}
    for fmt, section in sections(formats).items():
        reports[fmt] = _run(tmp_path, fmt, tree(section, workers=2 if fmt == "recordio" else 0))
    values = {fmt: [(r["query_model"], r["gallery_model"], r["metric"], r["value"]) for r in rep["results"]]
              for fmt, rep in reports.items()}
    assert values["imagefolder"] == values["list"] == values["recordio"]
    model = load_model(tmp_path / "recordio" / "models" / "l2" / "model.safetensors")
    assert model.meta["preprocessing"]["input"] == [3, 16, 16]
    assert model.meta["preprocessing"]["color"] == "rgb" and model.meta["preprocessing"]["mean"] == [0.5]
    report = json.loads((tmp_path / "list" / "report.json").read_text())
    assert report["allocation"]["old_images"] + report["allocation"]["new_images"] > 0
    assert "list train.txt" in report["dataset"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path).backbone.state_dict()


def test_sigkill_mid_epoch_then_resume_matches(formats, tmp_path):
    t = tree(sections(formats)["imagefolder"], workers=2)
    t["new"]["train"].update(epochs=3, batch_size=4, checkpoint_every=1)  # the paragon: 15 steps an epoch
    t["methods"] = []
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(t))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "bctkit.cli", "run", str(cfg), "--quiet"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    sidecar = out / "models" / "paragon" / "checkpoint.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("step", 0) >= 1:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert meta.get("step", 0) >= 1, "the run never reached a mid-epoch checkpoint"
    assert not (out / "models" / "paragon" / "model.safetensors").exists()
    done = subprocess.run([*cmd, "--out", str(out), "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    whole = subprocess.run([*cmd, "--out", str(tmp_path / "whole")], env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    for name in ("old", "paragon"):
        a = _weights(out / "models" / name / "model.safetensors")
        b = _weights(tmp_path / "whole" / "models" / name / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_bad_input_is_one_line(formats, tmp_path, capsys):
    cases = [
        (tree({"dataset": "imagefolder", "imagefolder": {"root": str(tmp_path / "nowhere")}}),
         "image folder not found"),
    ]
    no_colour = tree(sections(formats)["list"])
    no_colour["data"]["transform"] = {}
    cases.append((no_colour, r"takes 3x16x16 images .* but the data gives 1x16x16|first image is"))
    sized = tree(sections(formats)["list"])
    sized["old"]["backbone"]["image_size"] = 32
    sized["new"]["backbone"]["image_size"] = 32
    cases.append((sized, "takes 3x32x32 images"))
    few = tree(sections(formats)["imagefolder"], eval_images_per_class=7)
    cases.append((few, r"identities have >= 7 images"))
    for i, (t, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(t))
        assert main(["run", str(path), "--out", str(tmp_path / f"bad{i}"), "--quiet"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        err = lines[-1]
        assert err.startswith("bctkit: error:") and sum(ln.startswith("bctkit:") for ln in lines) == 1, lines
        assert re.search(message, err), err
        out = tmp_path / f"bad{i}"
        assert not out.exists() or not any(out.rglob("*")), sorted(map(str, out.rglob("*")))  # nothing


def test_a_failed_rerun_keeps_the_previous_config(formats, tmp_path, capsys):
    """A run that fails before writing any model restores the config.json it replaced."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"previous": true}')
    grey = tree(sections(formats)["list"])
    grey["data"]["transform"] = {}  # the first image is colour, a later one grey: fails in training
    path = tmp_path / "grey.yaml"
    path.write_text(yaml.safe_dump(grey))
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    assert "the first image is 3x16x16" in capsys.readouterr().err
    assert (out / "config.json").read_text() == '{"previous": true}'
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
