"""``--resume`` with a larger train.epochs continues a finished model from its final checkpoint; its
run id records the stages; any other change is still refused."""

import copy
import json
import shutil

import pytest
import torch
import yaml

from bctkit.cli import main
from bctkit.errors import ConfigError
from bctkit.models.store import load_model
from bctkit.run import benchmark
from bctkit.run.config import load_config
from bctkit.run.launch import run_pipeline
from tests.run.test_pipeline import TINY

SMALL = copy.deepcopy(TINY)
SMALL.update(methods=[{"method": "l2"}], paragon=False)
SMALL["new"]["train"]["schedule"] = {"name": "cosine"}  # a schedule that depends on the epochs
SMALL["evaluation"].update(backfill=False, retrieval=False)
MORE = ["new.train.epochs=3"]


def _run(cfg_path, out, overrides=(), **kw):
    logs: list[str] = []
    run_pipeline(load_config(cfg_path, list(overrides)), out, progress=False, log=logs.append, **kw)
    return logs


def _model(out, name="l2"):
    return load_model(out / "models" / name / "model.safetensors")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(config path, run folder) of a finished run whose new models trained 2 epochs."""
    root = tmp_path_factory.mktemp("finished")
    cfg_path = root / "small.yaml"
    cfg_path.write_text(yaml.safe_dump(SMALL))
    _run(cfg_path, root / "r")
    return cfg_path, root / "r"


@pytest.fixture(scope="module")
def continued(finished, tmp_path_factory):
    """(run folder, log) of the finished run continued to 3 epochs with --resume."""
    cfg_path, done = finished
    out = tmp_path_factory.mktemp("continued") / "r"
    shutil.copytree(done, out)
    return out, _run(cfg_path, out, MORE, resume=True)


def test_more_epochs_continue_the_finished_model(finished, continued):
    _, done = finished
    out, logs = continued
    assert "[l2] continuing the finished model from epoch 2 to 3 (only train.epochs changed)" in logs
    assert any(line.startswith("[old] reusing finished model") for line in logs)
    assert not any("training on" in line for line in logs)
    before, after = _model(done), _model(out)
    assert [h["epoch"] for h in after.meta["history"]] == [1, 2, 3]
    assert after.meta["history"][:2] == before.meta["history"]
    assert after.meta["train"]["epochs"] == 3
    assert after.meta["continued_from"] == [{"epochs": 2, "run_id": before.meta["run_id"]}]
    assert after.meta["config_key"] != before.meta["config_key"]
    assert after.meta["run_id"] != after.meta["config_key"]  # the stages are part of its identity
    ckpt = json.loads((out / "models" / "l2" / "checkpoint.json").read_text())
    assert (ckpt["run_id"], ckpt["epoch"]) == (after.meta["run_id"], 3)
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["l2"]["continued_from"] == after.meta["continued_from"]
    assert "continued_from" not in report["models"]["old"]


def test_a_continued_model_is_not_the_model_trained_from_scratch(finished, continued, tmp_path):
    cfg_path, _ = finished
    out, _ = continued
    _run(cfg_path, tmp_path / "scratch", MORE)
    scratch, after = _model(tmp_path / "scratch"), _model(out)
    assert _model(tmp_path / "scratch", "old").fingerprint == _model(out, "old").fingerprint
    assert scratch.meta["config_key"] == after.meta["config_key"]
    assert scratch.meta["run_id"] == scratch.meta["config_key"] != after.meta["run_id"]
    assert scratch.meta["continued_from"] == []
    # its first two epochs ran under the 2-epoch cosine schedule
    theirs = after.backbone.state_dict()
    assert any(not torch.equal(t, theirs[k]) for k, t in scratch.backbone.state_dict().items())
    assert scratch.fingerprint != after.fingerprint


def test_a_continued_model_is_reused(finished, continued):
    cfg_path, _ = finished
    out, _ = continued
    logs = _run(cfg_path, out, MORE, resume=True)
    assert sum("reusing finished model" in line for line in logs) == 2
    assert not any("continuing" in line or "training on" in line for line in logs)


def test_fewer_epochs_or_another_change_are_refused(finished, tmp_path, capsys):
    cfg_path, done = finished
    out = tmp_path / "r"
    shutil.copytree(done, out)
    fewer = ["run", str(cfg_path), "--out", str(out), "--resume", "--quiet", "--set", "new.train.epochs=1"]
    assert main(fewer) == 2
    err = capsys.readouterr().err
    assert "finished l2 model of another configuration" in err
    assert "only a larger train.epochs continues a finished model" in err
    # an lr given without lr_batch is used unscaled (the margin-head default lr_batch goes)
    with pytest.raises(ConfigError, match=r"differs in new.train.epochs, new.train.optimizer.lr, "
                                          r"new.train.optimizer.lr_batch\).*only a larger train.epochs "
                                          r"continues"):
        _run(cfg_path, out, [*MORE, "new.train.optimizer.lr=0.05"], resume=True)
    with pytest.raises(ConfigError, match="only a larger train.epochs continues"):
        _run(cfg_path, out, MORE)  # without --resume
    ckpt = out / "models" / "l2" / "checkpoint.safetensors"
    ckpt.unlink()
    more = ["run", str(cfg_path), "--out", str(out), "--resume", "--quiet", "--set", "new.train.epochs=3"]
    assert main(more) == 2  # it would continue from its final checkpoint, which is gone
    assert "continued to 3 epochs only from its final checkpoint checkpoint.safetensors, which is missing" \
        in capsys.readouterr().err
    assert _model(out).meta["run_id"] == _model(done).meta["run_id"]  # nothing was replaced


def test_an_interrupted_continuation_resumes_as_one(finished, continued, tmp_path, monkeypatch):
    cfg_path, done = finished
    out = tmp_path / "r"
    shutil.copytree(done, out)
    train_model = benchmark.train_model

    def killed(*args, **kw):
        # 72 images / batch 16 = 4 steps an epoch: stopped in the third epoch after its first step's
        # checkpoint, as a kill during the second step would leave it
        train_model(*args, **kw, stop_after_step=10)
        raise RuntimeError("killed")

    monkeypatch.setattr(benchmark, "train_model", killed)
    with pytest.raises(RuntimeError, match="killed"):
        _run(cfg_path, out, [*MORE, "new.train.checkpoint_every=1"], resume=True)
    monkeypatch.undo()
    whole, _ = continued
    ckpt = json.loads((out / "models" / "l2" / "checkpoint.json").read_text())
    assert (ckpt["run_id"], ckpt["epoch"], ckpt["step"]) == (_model(whole).meta["run_id"], 2, 1)
    logs = _run(cfg_path, out, MORE, resume=True)
    assert "[l2] continuing the finished model from epoch 2 to 3 (only train.epochs changed)" in logs
    assert any("resuming from" in line and "at epoch 3 step 2 of 3" in line for line in logs)
    a, b = _model(out), _model(whole)
    assert a.meta["run_id"] == b.meta["run_id"] and a.fingerprint == b.fingerprint
    assert [h["loss"] for h in a.meta["history"]] == [h["loss"] for h in b.meta["history"]]


def test_a_continued_old_model_retrains_the_models_trained_against_it(finished, tmp_path):
    cfg_path, done = finished
    out = tmp_path / "r"
    shutil.copytree(done, out)
    older = ["old.train.epochs=3"]
    with pytest.raises(ConfigError, match=r"finished l2 model of another configuration.*this run continued "
                                          r"old, and models trained against a continued model must be "
                                          r"trained again\): .*--overwrite"):
        _run(cfg_path, out, older, resume=True)
    old = _model(out, "old")
    assert old.meta["continued_from"][0]["run_id"] == _model(done, "old").meta["run_id"]
    assert old.fingerprint != _model(done, "old").fingerprint
    logs = _run(cfg_path, out, older, resume=True, overwrite=True)
    assert any(line.startswith("[old] reusing finished model") for line in logs)
    # its key holds the old model's fingerprint
    assert any(line.startswith("[l2] training on 72 images, 12 classes") for line in logs)
    assert _model(out).meta["config_key"] != _model(done).meta["config_key"]
