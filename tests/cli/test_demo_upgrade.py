"""`bctkit demo --upgrade --quick`: the README's upgrade walk-through end to end on a few glyph
identities: arcface_torch files and a RecordIO set -> a passed certificate -> ONNX export -> a
half-backfilled gallery searched by the export."""

import json

import pytest
import torch

from bctkit.cli import main
from bctkit.cli.demo_upgrade import top1
from bctkit.data.sources.recordio import RecordIOSource
from bctkit.evaluation.certificate import verify_certificate
from bctkit.gallery import GalleryStore


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("upgrade-demo") / "d"
    mp = pytest.MonkeyPatch()
    mp.setenv("BCTKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        code = main(["demo", "--upgrade", "--quick", "--quiet", "--out", str(out)])
    finally:
        mp.undo()
    return out, code


def test_the_walk_through_ends_in_a_passed_certificate_and_a_half_backfilled_gallery(demo):
    out, code = demo
    assert code == 0
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
    assert items == 12 * 2 and summary["backfilled"] == items // 2
    versions = GalleryStore.open(out / "gallery").versions()
    names = {fp: v["name"] for fp, v in versions.items()}
    assert sorted(names.values()) == ["bct", "old"]
    assert sorted(v["count"] for v in versions.values()) == [items // 2, items - items // 2]
    # the top-1 printed is the hits files' (an independent count over the JSON)
    for name, key in [("hits-before-backfill.json", "search_top1_before_backfill"),
                      ("hits-half-backfilled.json", "search_top1_half_backfilled")]:
        rows = json.loads((out / name).read_text())["queries"]
        assert len(rows) == 12 * 3
        versions = {hit["version"] for row in rows for hit in row["results"]}
        assert versions <= set(names)
        good = [r["results"][0]["id"].split("/")[0] == r["query"].split("/")[0] for r in rows]
        assert summary[key] == pytest.approx(100 * sum(good) / len(good), abs=0.01)
        assert top1(out / name) == pytest.approx(summary[key])
    half = json.loads((out / "hits-half-backfilled.json").read_text())["queries"]
    assert len({hit["version"] for row in half for hit in row["results"]}) == 2  # a mixed-version search


def test_the_old_model_is_in_arcface_torch_layout_and_the_data_is_recordio(demo):
    out, _ = demo
    sd = torch.load(out / "old" / "model.pt", weights_only=True)
    assert "layer4.1.bn3.running_var" in sd and sd["fc.weight"].shape == (128, 512 * 2 * 2)
    shards = [torch.load(out / "old" / f"softmax_fc_gpu_{r}.pt", weights_only=True)["weight"] for r in (0, 1)]
    assert [len(s) for s in shards] == [12, 12]  # 24 classes over two ranks
    source = RecordIOSource(out / "data" / "train")
    assert len(source) == 24 * 8 and source.num_classes == 24
    cfg = (out / "upgrade.yaml").read_text()
    assert "DEMO/" not in cfg and str((out / "old" / "model.pt").resolve()) in cfg


def test_a_second_run_reuses_everything(demo, capsys, monkeypatch, tmp_path):
    out, _ = demo
    before = (out / "old" / "model.pt").stat().st_mtime_ns
    monkeypatch.setenv("BCTKIT_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--upgrade", "--quick", "--quiet", "--resume", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "reusing finished model" in err and "training the old model" not in err
    assert (out / "old" / "model.pt").stat().st_mtime_ns == before
