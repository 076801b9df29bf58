"""Combining repeated runs: means, sample sds, criterion counts and means over allocations, checked
against numpy on hand-made run directories."""

import json

import numpy as np
import pytest

from bctkit.cli import main
from bctkit.errors import FileFormatError
from bctkit.evaluation.aggregate import aggregate, load_run, write_aggregate

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
