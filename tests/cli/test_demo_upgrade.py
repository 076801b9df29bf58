"""`bctkit demo --upgrade --quick`: the README's upgrade walk-through end to end on a few glyph
identities: arcface_torch files and a RecordIO set -> a passed certificate -> ONNX export -> a
half-backfilled gallery searched by the export.

At this size whether the new model beats the old one is decided by rounding (measured: its cross
top-1 moved between 27.5 % and 41.25 % with torch's kernel family, the old model at 31.25 %), so the
demo runs in a subprocess on the portable kernels (PINNED): one thread, ATen's default kernels,
oneDNN at SSE4.1 and MKL's compatible path, which every x86-64 CPU computes alike."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from bctkit.cli.demo_upgrade import fresh_gallery, top1
from bctkit.data.sources.recordio import RecordIOSource
from bctkit.errors import ConfigError
from bctkit.evaluation.certificate import verify_certificate
from bctkit.gallery import GalleryStore
from bctkit.run.example_upgrade import GALLERY_PER_ID, QUICK

PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default",
          "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"}


def _command(out, cache, *extra: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, **PINNED, "BCTKIT_CACHE": str(cache)}
    return [sys.executable, "-m", "bctkit", "demo", "--upgrade", "--quick", "--quiet", "--out", str(out),
            *extra], env


def _demo(out, cache, *extra: str) -> subprocess.CompletedProcess:
    cmd, env = _command(out, cache, *extra)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


_EARLY: dict = {}
"""The first demo run, started by :func:`start_early` (tests/conftest.py calls it once this module's
tests are selected): it runs on one thread, so it runs beside the other tests on the second core
instead of after them."""


def start_early() -> None:
    """Start the first demo run in the background (once); :func:`demo` waits for it."""
    if _EARLY:
        return
    root = Path(tempfile.mkdtemp(prefix="bctkit-upgrade-demo-"))
    out, cache = root / "d", root / "cache"
    cache.mkdir()
    cmd, env = _command(out, cache)
    logs = [open(root / name, "w") for name in ("stdout.txt", "stderr.txt")]  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, env=env, stdout=logs[0], stderr=logs[1], text=True)
    _EARLY.update(root=root, out=out, cache=cache, proc=proc, logs=logs)


@pytest.fixture(scope="module")
def demo():
    start_early()
    proc = _EARLY["proc"]
    try:
        proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for fh in _EARLY["logs"]:
            fh.close()
    root = _EARLY["root"]
    done = subprocess.CompletedProcess(proc.args, proc.returncode, (root / "stdout.txt").read_text(),
                                       (root / "stderr.txt").read_text())
    yield _EARLY["out"], _EARLY["cache"], done
    shutil.rmtree(root, ignore_errors=True)


def test_the_walk_through_ends_in_a_passed_certificate_and_a_half_backfilled_gallery(demo):
    out, _, proc = demo
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    crit = summary["criterion"]
    assert crit["passed"] and crit["cross"] > crit["old_self"]
    cert = verify_certificate(out / "run" / "certificates" / "bct__old.json")
    assert cert["passed"] and cert["criterion"] == crit
    assert (out / "export" / "bct" / "model.onnx").is_file()
    card = json.loads((out / "export" / "bct" / "card.json").read_text())
    assert card["compatibility"]["criterion"]["passed"] is True
    # the gallery: every old item once, half of them re-embedded by the new model
    items = summary["gallery_items"]
    assert items == QUICK.test_ids * GALLERY_PER_ID and summary["backfilled"] == items // 2
    versions = GalleryStore.open(out / "gallery").versions()
    names = {fp: v["name"] for fp, v in versions.items()}
    assert sorted(names.values()) == ["bct", "old"]
    assert sorted(v["count"] for v in versions.values()) == [items // 2, items - items // 2]
    # the top-1 printed is the hits files' (an independent count over the JSON)
    queries = QUICK.test_ids * (QUICK.test_images_per_id - GALLERY_PER_ID)
    for name, key in [("hits-before-backfill.json", "search_top1_before_backfill"),
                      ("hits-half-backfilled.json", "search_top1_half_backfilled")]:
        rows = json.loads((out / name).read_text())["queries"]
        assert len(rows) == queries
        assert {hit["version"] for row in rows for hit in row["results"]} <= set(names)
        good = [r["results"][0]["id"].split("/")[0] == r["query"].split("/")[0] for r in rows]
        assert summary[key] == pytest.approx(100 * sum(good) / len(good), abs=0.005)  # rounded to 0.01
        assert top1(out / name) == pytest.approx(100 * sum(good) / len(good))
    half = json.loads((out / "hits-half-backfilled.json").read_text())["queries"]
    assert len({hit["version"] for row in half for hit in row["results"]}) == 2  # a mixed-version search
    assert "expected top-1 of bct queries" in proc.stdout  # status read the run's report
    line = f"certificate: top1 cross {100 * crit['cross']:.2f} % > old self {100 * crit['old_self']:.2f} %"
    assert line in (out / "summary.md").read_text()


def test_the_old_model_is_in_arcface_torch_layout_and_the_data_is_recordio(demo):
    out, _, _ = demo
    sd = torch.load(out / "old" / "model.pt", weights_only=True)
    assert "layer4.1.bn3.running_var" in sd and sd["fc.weight"].shape == (128, 512 * 2 * 2)
    shards = [torch.load(out / "old" / f"softmax_fc_gpu_{r}.pt", weights_only=True)["weight"] for r in (0, 1)]
    assert [len(s) for s in shards] == [QUICK.train_ids // 2] * 2
    source = RecordIOSource(out / "data" / "train")
    assert len(source) == QUICK.train_ids * QUICK.images_per_id and source.num_classes == QUICK.train_ids
    cfg = (out / "upgrade.yaml").read_text()
    assert "DEMO/" not in cfg and str((out / "old" / "model.pt").resolve()) in cfg


def test_a_second_run_reuses_everything(demo):
    out, cache, _ = demo
    before = (out / "old" / "model.pt").stat().st_mtime_ns
    proc = _demo(out, cache, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert "reusing finished model" in said and "training the old model" not in said
    assert (out / "old" / "model.pt").stat().st_mtime_ns == before


def test_only_an_earlier_demo_store_is_removed(demo, tmp_path):
    """The demo rebuilds its gallery every run; a folder of the same name that is not a store is
    refused and kept."""
    out, _, _ = demo
    copy = tmp_path / "gallery"
    subprocess.run(["cp", "-a", str(out / "gallery"), str(copy)], check=True)
    fresh_gallery(copy)
    assert not copy.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"mine exists and is not a gallery store of an earlier demo"):
        fresh_gallery(mine)
    assert (mine / "keep.txt").read_text() == "x"
