"""Combining repeated runs: means, sample sds, criterion counts and means over allocations, checked
against numpy on hand-made run directories."""

import json
import math

import numpy as np
import pytest

from bctkit.cli import main
from bctkit.errors import ConfigError, FileFormatError
from bctkit.run.aggregate import aggregate, load_run, write_aggregate

METRICS = ("tar@far=1e-3", "tar@far=1e-4", "top1")


def _write_run(root, values):
    """values[allocation][model] = (cross or None, self) per metric (same pair for every metric,
    shifted by the metric's index, so a mixed-up metric shows)."""
    for alloc, models in values.items():
        results, compat = [], {}
        for name, (cross, self_) in models.items():
            for i, m in enumerate(METRICS):
                results.append({"query_model": name, "gallery_model": name, "metric": m, "value": self_ + i})
                if cross is not None:
                    results.append({"query_model": name, "gallery_model": "old", "metric": m,
                                    "value": cross + i})
                    compat.setdefault(name, {})[m] = {"criterion": cross > models["old"][1]}
        results.append({"query_model": "old", "gallery_model": "old", "metric": "map", "value": 0.5})
        (root / alloc).mkdir(parents=True)
        (root / alloc / "report.json").write_text(json.dumps(
            {"models": list(models), "results": results, "compatibility": compat}))
    return root


RUNS = [
    {"open-data": {"old": (None, 0.50), "a": (0.52, 0.70), "b": (0.48, 0.71)},
     "identical-data": {"old": (None, 0.60), "a": (0.61, 0.65), "b": (0.62, 0.66)}},
    {"open-data": {"old": (None, 0.50), "a": (0.49, 0.72), "b": (0.53, 0.69)},
     "identical-data": {"old": (None, 0.60), "a": (0.63, 0.66), "b": (0.58, 0.65)}},
    {"open-data": {"old": (None, 0.50), "a": (0.54, 0.71), "b": (0.47, 0.70)},
     "identical-data": {"old": (None, 0.60), "a": (0.59, 0.64), "b": (0.64, 0.64), "c": (0.7, 0.7)}},
]


@pytest.fixture
def runs(tmp_path):
    return [_write_run(tmp_path / f"seed{i}", r) for i, r in enumerate(RUNS)]


def test_means_sds_and_criterion_counts_match_numpy(runs):
    loaded = [load_run(r) for r in runs]
    assert loaded[0]["metrics"] == list(METRICS)  # tar@far by FAR, descending, then top-k; no map
    res = aggregate(loaded, [str(r) for r in runs])
    assert res["dropped"] == [["identical-data", "c"]]
    rows = {(r["allocation"], r["model"]): r for r in res["rows"]}
    assert list(rows) == [(a, m) for a in ("open-data", "identical-data") for m in ("old", "a", "b")]
    for (alloc, model), row in rows.items():
        for i, m in enumerate(METRICS):
            self_ = np.array([run[alloc][model][1] for run in RUNS]) + i
            assert row[f"{m} self"]["mean"] == pytest.approx(self_.mean())
            assert row[f"{m} self"]["sd"] == pytest.approx(self_.std(ddof=1))
            if model == "old":
                assert row[f"{m} cross"] is None and row[f"{m} criterion runs"] is None
                continue
            cross = np.array([run[alloc][model][0] for run in RUNS])
            assert row[f"{m} cross"]["mean"] == pytest.approx(cross.mean() + i)
            assert row[f"{m} criterion runs"] == int((cross > RUNS[0][alloc]["old"][1]).sum())
            old_self = RUNS[0][alloc]["old"][1] + i
            assert row[f"{m} criterion on means"] == bool(cross.mean() + i > old_self)
    # b in identical-data: 2 of 3 runs pass, and the mean (0.6133) passes
    assert rows[("identical-data", "b")]["top1 criterion runs"] == 2
    assert rows[("identical-data", "b")]["top1 criterion on means"] is True
    # a in open-data: 2 of 3 runs pass, mean 0.5167 > 0.50
    assert rows[("open-data", "a")]["tar@far=1e-3 criterion runs"] == 2
    over = res["over_allocations"]["a"]["top1 cross"]
    per_run = [np.mean([run[a]["a"][0] + 2 for a in ("open-data", "identical-data")]) for run in RUNS]
    assert over["values"] == pytest.approx(per_run)
    assert over["mean"] == pytest.approx(np.mean(per_run))
    assert over["sd"] == pytest.approx(np.std(per_run, ddof=1))


def test_cli_writes_tables(runs, tmp_path, capsys):
    out = tmp_path / "agg"
    assert main(["aggregate", *map(str, runs), "--out", str(out)]) == 0
    md = (out / "aggregate.md").read_text()
    assert "| open-data | a | 51.67 ± 2.52 2/3 ✓ | 71.00 ± 1.00 |" in md
    assert "identical-data / c" in md
    assert json.loads((out / "aggregate.json").read_text())["n_runs"] == 3


def test_single_run_has_no_sd(runs, tmp_path):
    res = aggregate([load_run(runs[0])], ["one"])
    row = next(r for r in res["rows"] if r["model"] == "a")
    assert row["top1 self"]["sd"] is None and row["top1 self"]["n"] == 1
    write_aggregate(tmp_path / "one", res)
    table = (tmp_path / "one" / "aggregate.md").read_text().split("| allocation |")[1].split("## Mean")[0]
    assert "±" not in table and "| open-data | a | 52.00 1/1 ✓ | 70.00 |" in table


def test_bad_runs(runs, tmp_path, capsys):
    with pytest.raises(FileFormatError, match="no <allocation>/report.json"):
        load_run(tmp_path / "nothing")
    (runs[1] / "open-data" / "report.json").write_text('{"results": [')
    with pytest.raises(FileFormatError, match="open-data/report.json: not valid JSON"):
        load_run(runs[1])
    (runs[1] / "open-data" / "report.json").write_text('{"results": []}')
    with pytest.raises(FileFormatError, match="expected a bctkit report"):
        load_run(runs[1])
    (runs[2] / "open-data" / "report.json").unlink()
    (runs[2] / "identical-data" / "report.json").write_text(json.dumps(
        {"models": ["old"], "results": [{"query_model": "old", "gallery_model": "old", "metric": "top1",
                                         "value": 0.6}]}))
    with pytest.raises(FileFormatError, match="metrics .* differ"):
        aggregate([load_run(runs[0]), load_run(runs[2])], ["r0", "r2"])
    assert main(["aggregate", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no <allocation>/report.json" in capsys.readouterr().err


def _set_value(run, alloc, query, gallery, metric, value, raw=False):
    """Replace one record's value in a run's report (``raw``: write the JSON text as given)."""
    file = run / alloc / "report.json"
    rep = json.loads(file.read_text())
    for r in rep["results"]:
        if (r["query_model"], r["gallery_model"], r["metric"]) == (query, gallery, metric):
            r["value"] = "@@" if raw else value
    text = json.dumps(rep)
    file.write_text(text.replace('"@@"', value) if raw else text)


def _strict(text):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("literal", ["NaN", "null"])
def test_not_measurable_values_are_not_measurable_in_the_aggregate(runs, tmp_path, literal):
    """An n/m value (NaN in older reports, null in strict ones) in any run makes that mean, its sd and
    the criterion not measurable, and leaves every other cell alone."""
    _set_value(runs[1], "open-data", "a", "old", "tar@far=1e-4", literal, raw=True)
    _set_value(runs[2], "open-data", "old", "old", "top1", literal, raw=True)
    res = aggregate([load_run(r) for r in runs], [str(r) for r in runs])
    rows = {(r["allocation"], r["model"]): r for r in res["rows"]}
    cross = rows[("open-data", "a")]["tar@far=1e-4 cross"]
    assert math.isnan(cross["mean"]) and cross["sd"] is None and cross["n"] == 3
    assert rows[("open-data", "a")]["tar@far=1e-4 criterion runs"] is None
    assert rows[("open-data", "a")]["tar@far=1e-4 criterion on means"] is None
    cross3 = rows[("open-data", "a")]["tar@far=1e-3 cross"]
    assert cross3["mean"] == pytest.approx(np.mean([0.52, 0.49, 0.54]))
    old_self = rows[("open-data", "old")]["top1 self"]
    assert math.isnan(old_self["mean"]) and old_self["sd"] is None
    for model in ("a", "b"):  # no old self test to compare with
        assert rows[("open-data", model)]["top1 criterion on means"] is None
        assert rows[("open-data", model)]["top1 criterion runs"] is None
    assert rows[("identical-data", "a")]["top1 criterion runs"] == 2
    over = res["over_allocations"]["a"]["tar@far=1e-4 cross"]
    assert math.isnan(over["mean"]) and over["sd"] is None
    write_aggregate(tmp_path / "agg", res)
    md = (tmp_path / "agg" / "aggregate.md").read_text()
    old_line = next(line for line in md.splitlines() if line.startswith("| open-data | old |"))
    assert old_line.endswith("| — | n/m |")  # top1: cross (none for old), self n/m
    back = _strict((tmp_path / "agg" / "aggregate.json").read_text())
    row = next(r for r in back["rows"] if (r["allocation"], r["model"]) == ("open-data", "a"))
    assert row["tar@far=1e-4 cross"]["mean"] is None


def _with_config(run, config, where="report"):
    """Store ``config`` (with each allocation's scenario) in the run's reports or beside them."""
    for alloc in ("open-data", "identical-data"):
        file = run / alloc / "report.json"
        cfg = {**config, "allocation": {**config["allocation"], "scenario": alloc}}
        if where == "report":
            file.write_text(json.dumps({**json.loads(file.read_text()), "config": cfg}))
        else:
            (run / alloc / "config.json").write_text(json.dumps(cfg))


CONFIG = {"allocation": {"scenario": "x", "ratio": 0.3, "seed": 1},
          "new": {"train": {"seed": 1, "optimizer": {"lr": 0.1}}},
          "data": {"synthetic": {"seed": 0}, "split_seed": 0}, "methods": [{"method": "l2", "params": {}}]}


def test_runs_that_differ_only_in_seeds_aggregate(runs):
    for i, run in enumerate(runs):
        seeds = {"allocation": {**CONFIG["allocation"], "seed": i},
                 "new": {"train": {"seed": 10 + i, "optimizer": {"lr": 0.1}}},
                 "data": {"synthetic": {"seed": i}, "split_seed": i}}
        _with_config(run, {**CONFIG, **seeds}, where="report" if i else "config.json")
    assert aggregate([load_run(r) for r in runs], ["r0", "r1", "r2"])["n_runs"] == 3


@pytest.mark.parametrize("where", ["report", "config.json"])
def test_runs_of_different_configs_are_refused(runs, where):
    _with_config(runs[0], CONFIG, where)
    _with_config(runs[1], {**CONFIG, "new": {"train": {"seed": 2, "optimizer": {"lr": 0.2}}},
                           "methods": [{"method": "l2", "params": {"threshold": 0.1}}]}, where)
    _with_config(runs[2], CONFIG, where)
    with pytest.raises(ConfigError, match=r"^r1: open-data: config differs from r0's in ") as exc:
        aggregate([load_run(r) for r in runs], ["r0", "r1", "r2"])
    msg = str(exc.value)
    assert "new.train.optimizer.lr" in msg and "methods.0.params.threshold" in msg
    assert "seed" not in msg.split(";")[0] and "\n" not in msg


def test_options_that_do_not_change_results_may_differ(runs):
    """train.device and train.checkpoint_every are not part of a run's key; neither are seeds."""
    from bctkit.run.config import load_config

    sets = [[], ["new.train.device=cpu", "old.train.checkpoint_every=5", "allocation.seed=1"],
            ["old.train.seed=3", "data.synthetic.seed=4"]]
    for run, overrides in zip(runs, sets, strict=True):
        _with_config(run, load_config(None, overrides).model_dump(mode="json"))
    assert aggregate([load_run(r) for r in runs], ["r0", "r1", "r2"])["n_runs"] == 3
    _with_config(runs[2], load_config(None, ["old.train.epochs=3"]).model_dump(mode="json"))
    with pytest.raises(ConfigError, match=r"r2: open-data: config differs from r0's in old\.train\.epochs;"):
        aggregate([load_run(r) for r in runs], ["r0", "r1", "r2"])
    # a config this version cannot read (another bctkit version) is compared as it is
    _with_config(runs[2], {**load_config(None).model_dump(mode="json"), "retired_section": {}})
    with pytest.raises(ConfigError, match=r"config differs from r0's in retired_section;"):
        aggregate([load_run(r) for r in runs], ["r0", "r1", "r2"])
