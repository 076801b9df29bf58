"""Config loading: overrides, and one-line errors for every kind of bad config."""

import pytest

from bctkit.errors import ConfigError
from bctkit.run.config import for_scenario, load_config, packaged_config


@pytest.mark.parametrize(
    "name", ["demo", "demo-quick", "synthetic-demo", "synthetic-quick", "unibct-paper", "mixbct-official",
             "bt2-paper", "demo-chain", "demo-transform"]
)
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
        (["chain=[{method: bt2, name: v2}, {method: bct, name: v3}]"], "chain.1: bct: new embedding_dim 128"),
        (["chain=[{method: bt2, name: v2}, {method: bct, name: v3, backbone: {arch: r8, width: 16, "
          "embedding_dim: 160}}]"], "chain.1: v3: .*BT.2 model"),
        (["chain=[{method: bt2, name: v2}, {method: lwf, name: v3, backbone: {embedding_dim: 160}}]"],
         "chain.1: .*synthesize_all"),
        (["chain=[{method: bct, name: v2, backbone: {in_channels: 3}}]"], "chain.0.backbone.in_channels"),
        (["chain=[{method: bct, name: l2}]"], "used twice"),
        (["chain=[{method: bct, name: v2, ratio: 1.5}]"], "chain.0.ratio"),
        (["methods=[{method: bt2, params: {k: 0}}]"], "option 'k'"),
        (["new.backbone.embedding_dim=200", "methods=[{method: bt2}]"], "must exceed"),
        (["allocation.scenario=identical-data"], "identical-data .*new.backbone equals old.backbone"),
        (["scenario_overrides={closed-data: {}}"], "scenario_overrides.closed-data"),
        (["scenario_overrides={identical-data: {new: {backbone: {width: 0}}}}"],
         "scenario_overrides.identical-data: new.backbone.width"),
        (["scenario_overrides={open-data: {new: {backbone: {in_channels: 3}}}}"],
         "scenario_overrides.open-data: new.backbone.in_channels=3 conflicts"),
        (["scenario_overrides={open-data: {methods: [{method: l2}, {method: l2}]}}"],
         "scenario_overrides.open-data: .*used twice"),
        (["scenario_overrides={open-data: {allocation: {scenario: open-class}}}"], "may not set"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(packaged_config("demo-quick"), overrides)
    assert "\n" not in str(exc.value)


def test_chain_of_bt2_models_accumulates_dims():
    chain = "chain=[{method: bt2, name: v2}, {method: bt2, name: v3}, {method: bct, name: v4, " \
            "params: {new_classes: synthesize_all}, backbone: {arch: r8, embedding_dim: 192}}]"
    cfg = load_config(packaged_config("demo-quick"), [chain])
    assert [v.display_name for v in cfg.chain] == ["v2", "v3", "v4"]
    with pytest.raises(ConfigError, match="chain.2: bct: new embedding_dim 160 < old embedding_dim 192"):
        load_config(packaged_config("demo-quick"), [chain.replace("192", "160")])


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


def test_scenario_overrides_apply_to_their_scenario_only():
    wide = "scenario_overrides={identical-data: {new: {backbone: {width: 32}, train: {epochs: 12}}}}"
    cfg = load_config(packaged_config("demo-quick"), [wide])
    ident = for_scenario(cfg, "identical-data")
    assert ident.allocation.scenario == "identical-data" and not ident.scenario_overrides
    assert ident.new.backbone.width == 32 and ident.new.train.epochs == 12
    # the merge keeps every other field of the section it changes, and every other section
    assert ident.new.backbone.model_dump() == {**cfg.new.backbone.model_dump(), "width": 32}
    assert ident.new.train.batch_size == cfg.new.train.batch_size and ident.old == cfg.old
    assert ident.methods == cfg.methods and ident.data == cfg.data
    other = for_scenario(cfg, "open-class")
    assert other.new == cfg.new and other.allocation.scenario == "open-class"
    # a config whose own scenario is identical-data loads once the override gives it a new architecture
    load_config(packaged_config("demo-quick"), [wide, "allocation.scenario=identical-data"])
    with pytest.raises(ConfigError, match="identical-data"):
        for_scenario(load_config(packaged_config("demo-quick")), "identical-data")


@pytest.mark.parametrize("name", ["demo", "synthetic-demo"])
def test_all_scenario_demos_are_valid_in_every_scenario(name):
    cfg = load_config(packaged_config(name))
    for scenario in ("extended-data", "open-data", "extended-class", "open-class", "identical-data"):
        assert for_scenario(cfg, scenario).allocation.scenario == scenario
    assert for_scenario(cfg, "identical-data").new.backbone != cfg.old.backbone


def test_config_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("old:\n  train: {epochs: 2}\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 31\)") as exc:
        load_config(bad)
    assert "\n" not in str(exc.value)


def test_duplicate_keys_are_refused(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("old:\n  train:\n    epochs: 2\n    batch_size: 16\n    epochs: 3\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: duplicate key 'epochs' \(line 5; first at line 3\)"):
        load_config(dup)
    dup.write_text("new:\n  train: {epochs: 2}\nold: {}\nnew:\n  backbone: {width: 8}\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: duplicate key 'new' \(line 4; first at line 1\)"):
        load_config(dup)
    with pytest.raises(ConfigError, match=r"--set .*duplicate key 'epochs'"):
        load_config(None, ["old.train={epochs: 2, epochs: 3}"])


def test_merge_keys_may_override_what_they_merge(tmp_path):
    """A YAML merge (<<) followed by one of the merged keys is an override, not a duplicate."""
    path = tmp_path / "merge.yaml"
    path.write_text("old:\n  train: &t {epochs: 2, batch_size: 16}\n"
                    "new:\n  train:\n    <<: *t\n    epochs: 3\n")
    cfg = load_config(path)
    assert (cfg.old.train.epochs, cfg.new.train.epochs, cfg.new.train.batch_size) == (2, 3, 16)


def test_allocation_class_order():
    """allocation.classes: first is checked against the scenario at load time, and the default is left
    out of the dump (run keys of configs written before the option stay the same)."""
    cfg = load_config(packaged_config("demo-quick"), ["allocation.scenario=extended-class",
                                                       "allocation.classes=first"])
    assert cfg.allocation.model_dump()["classes"] == "first"
    assert "classes" not in load_config(packaged_config("demo-quick")).allocation.model_dump()
    with pytest.raises(ConfigError, match="allocation.classes='first' chooses the classes of a class split"):
        load_config(packaged_config("demo-quick"), ["allocation.classes=first"])
