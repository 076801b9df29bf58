"""Repeated runs (seeds): combine the per-allocation reports of several runs into mean and
sample standard deviation per allocation, model and test, with the criterion counted per run and
checked on the means, and each model's mean over allocations (the figure papers compare methods by).

Single-run differences below the run-to-run spread say nothing; this is how to see that spread.
Runs must be of one configuration, up to seeds (any key ending in ``seed``) and options that do not
change results (``train.device``, ``train.checkpoint_every``). A value that is not measurable (NaN in
memory, null in report.json) in any run makes its mean, sd and criterion not measurable (n/m).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from bctkit.data.allocation import SCENARIOS
from bctkit.errors import ConfigError, FileFormatError
from bctkit.evaluation.report import CRITERION_MARK, fmt_percent, markdown_table, report_dir, summary_rows
from bctkit.run.config import RunConfig
from bctkit.storage import read_json, write_json, write_text

SIDES = ("cross", "self")


def load_run(path: Path, split: str = "test") -> dict[str, Any]:
    """One all-allocation run directory (``bctkit run --scenarios`` / ``bctkit demo``): its
    per-allocation reports as summary rows, with every TAR@FAR and top-k test they hold.
    ``split="validation"``: the reports of its validation evaluation (``<scenario>/validation``)."""
    reports: dict[str, dict[str, Any]] = {}
    configs: dict[str, dict[str, Any] | None] = {}
    for scenario in SCENARIOS:
        file = report_dir(path / scenario, split) / "report.json"
        if not file.is_file():
            continue
        rep = read_json(file, allow_nan=True)  # reports of older versions hold NaN for n/m values
        if not isinstance(rep, dict) or not isinstance(rep.get("results"), list) \
                or not isinstance(rep.get("models"), (list, dict)):
            raise FileFormatError(f"{file}: expected a bctkit report with 'results' and 'models'")
        reports[scenario] = rep
        configs[scenario] = _run_config(rep, file.parent / "config.json")
    if not reports:
        made = "" if split == "test" else ", with evaluation.split=validation"
        raise FileFormatError(f"{path}: no {report_dir(Path('<allocation>'), split) / 'report.json'} inside "
                              f"(expected a run made with --scenarios, or bctkit demo{made})")
    first = next(iter(reports.values()))
    names = {r["metric"] for r in first["results"]}
    tars = sorted((n for n in names if n.startswith("tar@far=")), key=lambda n: -float(n.split("=")[1]))
    tops = sorted((n for n in names if n.startswith("top")), key=lambda n: int(n[3:]))
    metrics = tars + tops
    return {"metrics": metrics, "rows": summary_rows(reports, metrics), "configs": configs}


def _run_config(report: dict[str, Any], config_file: Path) -> dict[str, Any] | None:
    """The config a report was made with: its ``config``, else the config.json beside it (None when
    neither is there or readable, e.g. reports of ``bctkit evaluate``)."""
    cfg = report.get("config")
    if isinstance(cfg, dict):
        return cfg
    try:
        cfg = read_json(config_file, allow_nan=True)
    except FileFormatError:
        return None
    return cfg if isinstance(cfg, dict) else None


def _comparable(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """``cfg`` as its run key sees it: defaults filled in, options that do not change results
    (train.device, train.checkpoint_every) left out; None when it is not a valid config (say, of
    another bctkit version)."""
    try:
        return RunConfig.model_validate(cfg).model_dump(mode="json", context={"key": True})
    except ValueError:
        return None


_ABSENT = object()  # a key one config has and the other has not


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths (list items by index) where two config trees differ, leaving out every key that
    ends in ``seed``: runs that differ only in seeds are what aggregation is for."""
    if prefix[:-1].rsplit(".", 1)[-1].endswith("seed"):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in dict.fromkeys([*a, *b])
                for d in config_differences(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{prefix}{k}.")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in config_differences(x, y, f"{prefix}{i}.")]
    return [] if a == b else [prefix[:-1]]


def _check_configs(summaries: list[dict[str, Any]], names: list[str]) -> None:
    """Refuse runs whose configs differ in more than seeds, per allocation, naming the keys."""
    first = summaries[0].get("configs") or {}
    for s, name in zip(summaries[1:], names[1:], strict=True):
        for alloc, cfg in (s.get("configs") or {}).items():
            ref = first.get(alloc)
            if cfg is None or ref is None:
                continue
            pair = _comparable(ref), _comparable(cfg)
            diff = config_differences(*pair) if None not in pair else config_differences(ref, cfg)
            if diff:
                raise ConfigError(
                    f"{name}: {alloc}: config differs from {names[0]}'s in {', '.join(diff)}; runs to "
                    "aggregate may differ only in seeds (keys ending in 'seed')")


def _stats(values: list[float]) -> dict[str, Any]:
    """Mean and sample sd of one value over runs; a NaN (not measurable) in any run makes the mean
    NaN (n/m) and the sd None."""
    if any(math.isnan(v) for v in values):
        return {"mean": math.nan, "sd": None, "n": len(values), "values": values}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def _nan(v: float | None) -> bool:
    return v is not None and math.isnan(v)


def aggregate(summaries: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Combine run summaries (``names`` label them in errors). Rows are matched by (allocation,
    model); only rows present in every run are kept, the rest are listed under ``dropped``."""
    if not summaries:
        raise FileFormatError("no run summaries given")
    metrics = summaries[0]["metrics"]
    for s, name in zip(summaries, names, strict=True):
        if s["metrics"] != metrics:
            raise FileFormatError(f"{name}: metrics {s['metrics']} differ from {names[0]}'s {metrics}")
    _check_configs(summaries, names)
    keyed = [{(r["allocation"], r["model"]): r for r in s["rows"]} for s in summaries]
    order = list(keyed[0])
    keys = [k for k in order if all(k in rows for rows in keyed)]
    dropped = sorted({k for rows in keyed for k in rows} - set(keys))
    rows: list[dict[str, Any]] = []
    for key in keys:
        row: dict[str, Any] = {"allocation": key[0], "model": key[1]}
        for m in metrics:
            for side in SIDES:
                vals = [rows[key].get(f"{m} {side}") for rows in keyed]
                missing = any(v is None for v in vals)
                row[f"{m} {side}"] = None if missing else _stats([float(v) for v in vals])
            met = [rows[key].get(f"{m} criterion") for rows in keyed]
            # the criterion is not measurable in a run whose cross test or old self test is n/m
            unmeasurable = any(_nan(rows[key].get(f"{m} cross"))
                               or _nan(rows.get((key[0], "old"), {}).get(f"{m} self")) for rows in keyed)
            row[f"{m} criterion runs"] = (None if unmeasurable or any(v is None for v in met)
                                          else sum(bool(v) for v in met))
        rows.append(row)
    old_self = {r["allocation"]: {m: r[f"{m} self"] for m in metrics} for r in rows if r["model"] == "old"}
    for row in rows:
        old = old_self.get(row["allocation"])
        for m in metrics:
            cross = row[f"{m} cross"]
            base = None if old is None else old[m]
            ok = None
            if cross is not None and base is not None and not _nan(cross["mean"]) and not _nan(base["mean"]):
                ok = cross["mean"] > base["mean"]
            row[f"{m} criterion on means"] = ok
    return {"runs": names, "n_runs": len(summaries), "metrics": metrics, "rows": rows,
            "dropped": [list(k) for k in dropped],
            "over_allocations": _over_allocations(keyed, keys, metrics)}


def _over_allocations(keyed: list[dict[Any, dict[str, Any]]], keys: list[tuple[str, str]],
                      metrics: list[str]) -> dict[str, Any]:
    """Per model and test: each run's mean over the allocations the model has, then mean and sd of
    those per-run means (the spread of the figure methods are ranked by)."""
    allocations: dict[str, list[str]] = {}
    for alloc, model in keys:
        allocations.setdefault(model, []).append(alloc)
    out: dict[str, Any] = {}
    for model, allocs in allocations.items():
        entry: dict[str, Any] = {"allocations": allocs}
        for m in metrics:
            for side in SIDES:
                per_run = []
                for rows in keyed:
                    vals = [rows[(a, model)].get(f"{m} {side}") for a in allocs]
                    if any(v is None for v in vals):
                        break
                    per_run.append(statistics.fmean(float(v) for v in vals))
                else:
                    entry[f"{m} {side}"] = _stats(per_run)
        out[model] = entry
    return out


def _cell(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "—"
    sd = "" if stat["sd"] is None or math.isnan(stat["mean"]) else f" ± {100 * stat['sd']:.2f}"
    return fmt_percent(stat["mean"]) + sd


def write_aggregate(out: Path, result: dict[str, Any]) -> None:
    """aggregate.json and aggregate.md (tables in %, mean ± sample sd over runs)."""
    metrics, n = result["metrics"], result["n_runs"]
    lines = [f"# bctkit: {n} runs combined", "",
             "Values in %: mean ± sample standard deviation over the runs "
             f"({', '.join(result['runs'])}). Cross: queries by the model, gallery by the old model. "
             f"k/{n}: runs in which the criterion (cross > old self, strict) held; ✓ / ✗: the criterion "
             "on the means.", ""]
    header = ["allocation", "model"] + [f"{m} {side}" for m in metrics for side in SIDES]
    table = []
    for row in result["rows"]:
        cells = [row["allocation"], row["model"]]
        for m in metrics:
            cross = _cell(row[f"{m} cross"])
            runs, ok = row[f"{m} criterion runs"], row[f"{m} criterion on means"]
            if runs is not None:
                cross += f" {runs}/{n}" + CRITERION_MARK[ok]
            cells += [cross, _cell(row[f"{m} self"])]
        table.append(cells)
    lines += markdown_table(header, table)
    lines += ["## Mean over allocations", "",
              "Each run's mean over the allocations the model was trained in, then mean ± sd over runs.", ""]
    header = ["model", "allocations"] + [f"{m} {side}" for m in metrics for side in SIDES]
    table = [[model, str(len(e["allocations"]))] + [_cell(e.get(f"{m} {side}")) for m in metrics
                                                     for side in SIDES]
             for model, e in result["over_allocations"].items()]
    lines += markdown_table(header, table)
    if result["dropped"]:
        lines += ["Rows not in every run (left out): "
                  + ", ".join(f"{a} / {m}" for a, m in result["dropped"]), ""]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "aggregate.json", result)
    write_text(out / "aggregate.md", "\n".join(lines))


__all__ = ["aggregate", "config_differences", "load_run", "write_aggregate"]
