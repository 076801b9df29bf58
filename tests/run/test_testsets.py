"""A run's test sets (evaluation.test_sets): every model of the run is evaluated on a test set read
from disk, with the same numbers ``bctkit evaluate`` gives for the run's model files; load-time
refusals."""

import json

import numpy as np
import pytest
import yaml

from bctkit.cli import main
from bctkit.errors import ConfigError
from bctkit.features import load_features
from bctkit.models.transformation import load_transformation
from bctkit.run.config import load_config, packaged_config
from bctkit.run.launch import run_pipeline
from tests.data.sources.conftest import encoded_images, write_folder
from tests.run.test_pipeline_files import tree


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BCTKIT_CACHE", str(tmp_path_factory.mktemp("cache")))


def test_run_evaluates_its_models_on_each_test_set(tmp_path, capsys):
    train = write_folder(tmp_path / "train", encoded_images(10, 6, size=(16, 16), seed=2))
    queries = write_folder(tmp_path / "q", encoded_images(5, 2, size=(16, 16), seed=3))
    gallery = write_folder(tmp_path / "g", encoded_images(7, 3, size=(16, 16), seed=4))
    cfg = tree({"dataset": "imagefolder", "imagefolder": {"root": str(train)}})
    cfg["data"]["eval_classes"] = 3
    cfg["evaluation"]["test_sets"] = [{"protocol": "retrieval", "data": [str(queries), str(gallery)],
                                       "name": "qg"}]
    cfg["transforms"] = [{"inner_dim": 16, "train": {"epochs": 2, "batch_size": 8}}]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "r"
    report = run_pipeline(load_config(path), out, progress=False, log=lambda _m: None)
    folder = out / "test_sets" / "qg"
    assert report["test_sets"]["qg"]["report"] == str(folder / "report.md")
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["test_sets"] == json.loads(json.dumps(report["test_sets"]))
    assert "| qg | [test_sets/qg/report.md](test_sets/qg/report.md) | " in (out / "report.md").read_text()
    in_run = json.loads((folder / "report.json").read_text())
    pairs = {(r["query_model"], r["gallery_model"]) for r in in_run["results"]}
    assert pairs >= {("l2", "old"), ("old", "old"), ("paragon", "h(old)")}
    assert [(c["query"], c["gallery"]) for c in report["test_sets"]["qg"]["certificates"]] == [
        ("l2", "old"), ("paragon", "h(old)")]
    # the transformed gallery of the test set: h applied to the old model's test-set features
    h = load_transformation(out / "models" / "h_old_")
    old = load_features(folder / "features" / "old.safetensors")
    assert np.array_equal(load_features(folder / "features" / "h(old).safetensors").feats.numpy(),
                          h.apply(old.feats)[0])
    assert in_run["transforms"]["h(old)"]["target"] == "paragon"
    models = out / "models"
    assert main(["evaluate", "--protocol", "retrieval", "--data", str(queries), str(gallery),
                 "--old", str(models / "old" / "model.safetensors"),
                 "--paragon", str(models / "paragon" / "model.safetensors"),
                 "--new", f"l2={models / 'l2' / 'model.safetensors'}", "--out", str(tmp_path / "alone"),
                 "--quiet", "--workers", "0"]) == 0
    alone = json.loads((tmp_path / "alone" / "report.json").read_text())

    def values(rep):
        return sorted((r["query_model"], r["gallery_model"], r["metric"], r["value"]) for r in rep["results"]
                      if "h(old)" not in (r["query_model"], r["gallery_model"]))

    assert values(in_run) == values(alone)


def test_test_set_refusals_at_load_time(tmp_path):
    quick = packaged_config("demo-quick")
    with pytest.raises(ConfigError, match="unknown test-set protocol 'nope'"):
        load_config(quick, ["evaluation.test_sets=[{protocol: nope, data: [x]}]"])
    with pytest.raises(ConfigError, match="'market' names two test sets"):
        load_config(quick, ["evaluation.test_sets=[{protocol: market, data: [a]}, "
                            "{protocol: market, data: [b]}]"])
    with pytest.raises(ConfigError, match="must be a plain folder name"):
        load_config(quick, ["evaluation.test_sets=[{protocol: market, data: [a], name: ../x}]"])
    with pytest.raises(ConfigError, match="evaluation.test_sets.0.data"):
        load_config(quick, ["evaluation.test_sets=[{protocol: market, data: []}]"])
    plain = load_config(quick).model_dump(mode="json")["evaluation"]
    assert "test_sets" not in plain and "protocol" not in plain
