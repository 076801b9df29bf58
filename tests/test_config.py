"""Config loading: overrides, and one-line errors for every kind of bad config."""

import pytest

from bctkit.config import load_config, packaged_config
from bctkit.errors import ConfigError


@pytest.mark.parametrize("name", ["demo", "demo-quick", "unibct-paper", "mixbct-official"])
def test_packaged_configs_load(name):
    cfg = load_config(packaged_config(name))
    assert cfg.methods


def test_overrides():
    overrides = ["old.train.epochs=2", "methods.0.params={threshold: 0.2}", "evaluation.fars=[0.01]"]
    cfg = load_config(packaged_config("demo-quick"), overrides)
    assert cfg.old.train.epochs == 2 and cfg.methods[0].params == {"threshold": 0.2}
    assert cfg.evaluation.fars == [0.01]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["old.trian.epochs=3"], "unknown key 'old.trian'"),
        (["old.train.epochs=abc"], "old.train.epochs"),
        (["methods=[{method: foo}]"], "unknown method 'foo'"),
        (["methods=[{method: l2, params: {thresh: 1}}]"], "option 'thresh'"),
        (["old.backbone.in_channels=3"], "conflicts"),
        (["methods=[{method: l2}, {method: l2}]"], "used twice"),
        (["methods=[{method: independent}]"], "paragon"),
        (["evaluation.gallery_per_class=10"], "no probes"),
        (["methods.9.name=x"], "not an index"),
        (["noequals"], "key.path=value"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(packaged_config("demo-quick"), overrides)
    assert "\n" not in str(exc.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("old: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
