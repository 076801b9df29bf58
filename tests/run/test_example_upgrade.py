"""The upgrade example's config: the README's walk-through is the packaged `upgrade-demo` config,
and the demo fills in its paths and sizes."""

import re
from pathlib import Path

import pytest
import yaml

from bctkit.errors import ConfigError
from bctkit.run.config import load_config, packaged_config
from bctkit.run.example_upgrade import FULL, QUICK, _record, _recorded, _start, _write_config

README = Path(__file__).parents[2] / "README.md"


def test_readme_walk_through_config_is_the_packaged_one():
    block = re.search(r"```yaml\n# upgrade\.yaml\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README lost the walk-through's upgrade.yaml block"
    assert yaml.safe_load(block.group(1)) == yaml.safe_load(packaged_config("upgrade-demo").read_text())


@pytest.mark.parametrize("size", [FULL, QUICK])
def test_written_config_points_at_the_example_and_loads(tmp_path, size):
    path = _write_config(tmp_path, size)
    text = path.read_text()
    assert "DEMO/" not in text and "# the form of its classifier" in text  # comments kept
    cfg = load_config(path, [])
    root = tmp_path.resolve()
    assert cfg.data.recordio.path == str(root / "data" / "train")
    assert cfg.old.weights == str(root / "old" / "model.pt")
    assert cfg.old.classifier.weights == [str(root / "old" / f"softmax_fc_gpu_{r}.pt") for r in (0, 1)]
    assert cfg.old.classifier.num_classes == size.train_ids
    assert cfg.data.eval_images_per_class == size.test_images_per_id
    train = cfg.new.train
    assert (train.epochs, train.batch_size) == (size.new_epochs, size.new_batch)
    assert (FULL.new_epochs, FULL.new_batch) == (6, 128)  # the packaged file's own
    # warm-up and clipping come from the margin-head defaults; the rate is the file's, unscaled
    assert train.grad_clip == 5.0 and train.schedule.warmup_epochs == 1.0
    assert train.optimizer.lr_batch is None and train.base_lr == 0.1


def test_a_folder_is_rewritten_whole_and_a_foreign_one_refused(tmp_path):
    """An example's folder written for other sizes (or half written) is emptied before it is written
    again, so none of its files stay among the new ones; a folder the demo did not write is refused
    and left as it is."""
    ours = tmp_path / "data"
    _start(ours)
    (ours / "id0099").mkdir()
    (ours / "id0099" / "0.png").write_bytes(b"old")
    assert _recorded(ours, {"a": 1}) is None  # incomplete
    _record(ours, {"a": 1})
    assert _recorded(ours, {"a": 1}) is not None and _recorded(ours, {"a": 2}) is None
    _start(ours)
    assert sorted(p.name for p in ours.iterdir()) == ["written.json"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"mine exists and was not written by `bctkit demo --upgrade`"):
        _start(foreign)
    assert (foreign / "keep.txt").read_text() == "x"
