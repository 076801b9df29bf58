"""Run reports: report.json (flat ``results`` records + ``models`` + ``config`` + analysis) and
report.md with tables and plots.

Record schema (kept by every extension): ``{query_model, gallery_model, metric, value, n, protocol}``.
Criterion (evaluation.md): a new model is compatible on a metric iff M(new, old) > M(old, old).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bctkit import __version__
from bctkit.evaluation.diagnosis import markdown_lines as diagnosis_lines
from bctkit.evaluation.plots import plot_summary
from bctkit.evaluation.protocols import rate_name
from bctkit.storage import write_json, write_text

GROUPS = (
    ("1:N identification", ("top", "tpir@")),
    ("1:1 verification", ("tar@", "auc", "acc")),
    ("Retrieval", ("map", "mp@")),
)
"""The self/cross tables: title and metric-name prefixes. Spreads and other measures that are not
compatibility metrics (names in :data:`NOT_JUDGED`, or matched by no group) get one more table,
without criterion marks, so no record of report.json is missing from report.md."""
NOT_JUDGED = ("_std", "index_recall@")
GAIN_METRICS = ("top1", "tpir@fpir=1e-2", "tar@far=1e-3", "tar@far=1e-4", "map")
"""Update-gain columns after the protocol's headline metrics (report["headline"]), where measured."""
NOT_RECORDED = "not recorded"
"""A Models-table cell whose fact the model's files do not record (an imported model's training set)."""
BACKFILL_ORDERS = {
    "random": "gallery classes re-embedded in a seeded random order (seed 0), what a backfill that "
              "knows nothing about the items gives",
    "distance": "the classes whose embedding changed most from the old to the new model first (mean "
                "1 - cos(old, new) over the compared coordinates): it needs every item's new "
                "embedding, so it is a reference for the best an ordering could do, not one a live "
                "backfill can follow",
    "benefit": "the classes whose stored embeddings (old, or h(old) for a transformed gallery) have the "
               "smallest L2 norm first (mean over the class's items), what `bctkit gallery backfill "
               "--order benefit` does with only what is known before re-embedding",
    "uncertainty": "(transformed galleries) the classes whose transformed embeddings h(old) are least "
                   "certain first (largest mean predicted log sigma^2, FastFill), what `bctkit gallery "
                   "backfill --order uncertainty` does after `bctkit gallery transform`",
}
"""One sentence per partial-backfill order of the report."""


def report_dir(out: Path, split: str) -> Path:
    """Where a run in ``out`` writes its reports and evaluation features: ``out`` itself for the
    test identities, ``out/validation`` for the validation split (so a run directory holds both, and
    the models trained once serve both)."""
    return out if split == "test" else out / "validation"


def lookup(records: list[dict[str, Any]], query: str, gallery: str, metric: str) -> float | None:
    """A record's value: None when there is no such record, NaN when it is not measurable (NaN in
    memory; report.json, which is strict JSON, holds null)."""
    for r in records:
        if r["query_model"] == query and r["gallery_model"] == gallery and r["metric"] == metric:
            return math.nan if r["value"] is None else float(r["value"])
    return None


# The criterion's mark after a cross-test value: met, missed, or not applicable.
CRITERION_MARK = {None: "", True: " ✓", False: " ✗"}


def fmt_percent(v: float | None) -> str:
    """A fraction as a percentage with two decimals; "—" for none, "n/m" for not measurable."""
    if v is None:
        return "—"
    if math.isnan(v):
        return "n/m"
    return f"{100 * v:.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table as lines, with a blank line after it."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ] + [""]


def _judged(metric: str) -> bool:
    return not any(tag in metric for tag in NOT_JUDGED)


def _self_cross(report: dict[str, Any], metrics: list[str], old: str, marks: bool = True) -> list[str]:
    records, compat = report["results"], report.get("compatibility", {})
    header = ["model"] + [f"{m} {side}" for m in metrics for side in ("self", "cross")]
    rows = []
    for name in report["models"]:
        row = [name]
        for m in metrics:
            row.append(fmt_percent(lookup(records, name, name, m)))
            info = compat.get(name, {}).get(m)
            if name == old or info is None:
                row.append("—")
                continue
            cross = lookup(records, name, old, m)
            mark = "" if not marks or cross is None or math.isnan(cross) else (
                " ✓" if info["criterion"] else " ✗")
            row.append(fmt_percent(cross) + mark)
        rows.append(row)
    return markdown_table(header, rows)


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    records, models = report["results"], report["models"]
    old = "old"
    names = list(models)
    metrics = list(dict.fromkeys(r["metric"] for r in records))
    lines = ["# bctkit report", ""]
    alloc = report.get("allocation", {})
    if alloc.get("scenario") == "upgrade":
        lines += [
            f"Dataset: {report.get('dataset', '')}. **Upgrade** of a given old model ({alloc['old']}): "
            f"new models trained on all {alloc['new_images']} training images / {alloc['new_classes']} "
            f"classes ({alloc['shared_classes']} classes in the old classifier).",
            "",
        ]
    elif alloc:
        lines += [
            f"Dataset: {report.get('dataset', '')}. Allocation **{alloc['scenario']}** "
            f"(ratio {alloc['ratio']}, seed {alloc['seed']}): old model trained on "
            f"{alloc['old_images']} images / {alloc['old_classes']} classes, new models on "
            f"{alloc['new_images']} images / {alloc['new_classes']} classes "
            f"({alloc['shared_classes']} classes shared).",
            "",
        ]
    else:
        lines += _dataset_line(report)
    if report.get("warnings"):
        lines += [f"- **Warning**: {w}" for w in report["warnings"]] + [""]
    lines += [
        "## Self and cross tests",
        "",
        "Self: queries and gallery by the same model. Cross: queries by the new model, gallery by "
        "the old model. Values in %. ✓ = criterion met (cross > old self, strict), ✗ = not met; "
        "n/m = not measurable with this many impostor pairs.",
        "",
    ]
    judged = [m for m in metrics if _judged(m)]
    for title, prefixes in GROUPS:
        group = [m for m in judged if m.startswith(prefixes)]
        if group:
            lines += [f"### {title}", ""] + _self_cross(report, group, old)
    rest = [m for m in metrics if not (_judged(m) and m.startswith(tuple(p for _, g in GROUPS for p in g)))]
    if rest:
        lines += ["### Other measures (no criterion)", ""] + _self_cross(report, rest, old, marks=False)
    protocols: dict[str, int] = {}
    for r in records:
        protocols.setdefault(r["protocol"].split(";")[0], r["n"])
    lines += ["Protocols (n = probes, queries or pairs behind each number):", ""]
    lines += [f"- {p} (n = {n})" for p, n in protocols.items()] + [""]
    lines += diagnosis_lines(report.get("diagnosis", []))
    compat = report.get("compatibility", {})
    gain_metrics = [m for m in dict.fromkeys((*report.get("headline", ()), *GAIN_METRICS)) if m in metrics]
    if compat and gain_metrics:
        lines += ["## Update gain", "",
                  "BCT Eq. 9: (M(new, old) - M(old, old)) / (M(paragon, paragon) - M(old, old)), in %; "
                  "shown only where the criterion holds (— otherwise).", ""]
        rows = []
        for name in names:
            if name in (old, "paragon") or name not in compat:
                continue
            gains = [compat[name].get(m, {}).get("update_gain") for m in gain_metrics]
            rows.append([name] + ["—" if g is None else f"{100 * g:.1f}" for g in gains])
        lines += markdown_table(["model"] + gain_metrics, rows)
    for metric, mat in report.get("matrices", {}).items():
        lines += [f"## Compatibility matrix: {metric} (row = query model, column = gallery model)", ""]
        rows = [[q] + [fmt_percent(lookup(records, q, g, metric)) for g in mat["models"]]
                for q in mat["models"]]
        lines += markdown_table(["query \\ gallery"] + mat["models"], rows)
    chain = report.get("chain")
    if chain:
        lines += ["## Chain of upgrades: " + " <- ".join(chain["models"]), "",
                  "AC: fraction of pairs i > j with M[i][j] > M[j][j] (strict). AM: mean of M[i][j] over "
                  "i > j (%). BC: mean over j of M[last][j] - M[j][j]; FC: mean over t of "
                  "M[t][t-1] - M[t][t] (CL2R, points).", ""]
        rows = [[m, f"{v['AC']:.2f}", f"{100 * v['AM']:.2f}", f"{100 * v['BC']:.2f}", f"{100 * v['FC']:.2f}"]
                for m, v in chain.items() if m != "models"]
        lines += markdown_table(["metric", "AC", "AM", "BC", "FC"], rows)
        for metric, v in chain.items():
            if metric == "models":
                continue
            lines += [f"{metric} (✓ / ✗: the newer query model on an older gallery meets / misses the "
                      "criterion):", ""]
            rows = [[q] + [fmt_percent(lookup(records, q, g, metric)) + CRITERION_MARK[ok]
                           for g, ok in zip(chain["models"], oks, strict=True)]
                    for q, oks in zip(chain["models"], v["criterion"], strict=True)]
            lines += markdown_table(["query \\ gallery"] + chain["models"], rows)
    lines += _transform_lines(report)
    lines += _flip_lines(report)
    backfill = report.get("backfill", {})
    if backfill:
        lines += ["## Partial backfill", "",
                  "Top-1 of new-model probes while a fraction p of the gallery classes is re-embedded by "
                  "the new model (p = 0: cross test, p = 1: new self test); for a transformed gallery "
                  "h(old), its target's probes on h(old) items partly re-embedded by the target (p = 0: "
                  "no image read at all). Area: trapezoid rule over p, in % as the values. Orders:", ""]
        lines += [f"- {order}: {text}." for order, text in BACKFILL_ORDERS.items()] + [""]
        rows = []
        for name, b in backfill.items():
            for order in (o for o in BACKFILL_ORDERS if o in b):  # reports before benefit lack it
                vals = b[order]["values"]
                rows.append([name, order, fmt_percent(vals[0]), fmt_percent(vals[len(vals) // 2]),
                             fmt_percent(vals[-1]), f"{100 * b[order]['area']:.2f}"])
        lines += markdown_table(["model", "order", "p=0", "p=0.5", "p=1", "area"], rows)
    certs = report.get("certificate_results", [])
    if certs:
        lines += ["## Compatibility certificates", "",
                  "One claim per new model and the model it must stay compatible with, sealed by a "
                  "sha256 of its contents (a check against edits, not a signature): check one with "
                  "`bctkit certificate verify FILE`, and give a passed one to a gallery with "
                  "`bctkit gallery certify`.", ""]
        rows = [[f"[{c['file']}]({c['file']})", f"{c['query']} → {c['gallery']}", c["metric"],
                 fmt_percent(c["cross"]), fmt_percent(c["old_self"]), "passed" if c["passed"] else "failed",
                 f"`{c['sha256'][:16]}`"] for c in certs]
        lines += markdown_table(["file", "queries → gallery", "criterion metric", "cross", "old self",
                                 "result", "sha256"], rows)
    plots = report.get("plots", [])
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Models", ""]
    rows = []
    for name, info in models.items():
        compat_dims, layout = info.get("compat_dims"), info.get("layout")
        dims = f"{info['embedding_dim']}" + (f" (cross tests use [0:{compat_dims}])" if compat_dims else "")
        if layout:
            dims = (f"{info['embedding_dim']} = bct [0:{layout['bct'][1]}] + added [{layout['added'][0]}:"
                    f"{layout['added'][1]}]; self tests all, cross tests bct")
        rows.append([name, info.get("method") or "—", _options(info.get("params")),
                     _recorded(info.get("train_images")), _recorded(info.get("num_classes")), dims,
                     f"`{info['fingerprint']}`"])
    header = ["model", "method", "options", "train images", "classes", "dims", "fingerprint"]
    lines += markdown_table(header, rows)
    lines += [f"bctkit {__version__}. Full numbers: report.json.", ""]
    return "\n".join(lines)


def _flip_lines(report: dict[str, Any]) -> list[str]:
    """The negative-flips table: per pair, the queries old / old got right at rank 1 and the pair
    gets wrong (and the mirror), as shares of the queries and counts."""
    flips = report.get("flips") or []
    if not flips:
        return []
    lines = ["## Negative flips", "",
             "Over the same top-1 queries: negative flips = right under old / old, wrong under the pair "
             "(what users notice as a regression); positive flips = the mirror. top-1 (pair) - top-1 "
             "(old / old) = positive - negative (on IJB only approximately: its top-1 averages G1 and "
             "G2). In % (count).", ""]
    rows = [[f"{f['query_model']} / {f['gallery_model']}",
             f"{100 * f['negative_flip_rate']:.2f} ({f['negative_flips']})",
             f"{100 * f['positive_flip_rate']:.2f} ({f['positive_flips']})", str(f["n"])] for f in flips]
    return lines + markdown_table(["queries / gallery", "negative flips", "positive flips", "queries"], rows)


def _transform_lines(report: dict[str, Any]) -> list[str]:
    """The transformed-gallery section: each h(old) searched by its target's queries, against the
    old self test (the criterion) and the target's self test (full backfill)."""
    transforms = report.get("transforms") or {}
    if not transforms:
        return []
    lines = ["## Transformed gallery (FCT / FastFill)", "",
             "The old gallery rewritten by a learned transformation h(old) -> new, with no image read, "
             "searched by the target model's queries. ✓ = criterion met (target / h(old) > old / old, "
             "strict). Recovered: share of the gap from old / old to the target's own self test that h "
             "closes without re-embedding, in %.", ""]
    rows = []
    for name, t in transforms.items():
        for metric in (m for m in report.get("headline", ()) if m in t["metrics"]):
            v = t["metrics"][metric]
            rec = v.get("recovered")
            rows.append([name, t["target"], metric, fmt_percent(v["old_self"]),
                         fmt_percent(v["cross"]) + (" ✓" if v["criterion"] else " ✗"),
                         fmt_percent(v["target_self"]), "—" if rec is None else f"{100 * rec:.1f}"])
    return lines + markdown_table(["transformed gallery", "queries", "metric", "old / old",
                                   "target / h(old)", "target / target", "recovered"], rows)


def _recorded(value: Any) -> str:
    """A Models-table fact, or :data:`NOT_RECORDED` where the model's files hold none."""
    return NOT_RECORDED if value is None else str(value)


def _dataset_line(report: dict[str, Any]) -> list[str]:
    """The Dataset line of a report without an allocation (``bctkit evaluate``): the images, the
    protocol and the files it read."""
    if not report.get("dataset"):
        return []
    protocol = report.get("test_set", {}).get("protocol", "split")
    files = report.get("data")
    where = (f"data: {', '.join(files)}" if files else "feature files: "
             + ", ".join(f"{k}={v}" for k, v in report.get("feature_files", {}).items()))
    return [f"Dataset: {report['dataset']}. Protocol **{protocol}**, {where}.", ""]


def _options(params: Any) -> str:
    """A model's method options as `k=v, ...` (every option it ran with; "—" when it has none)."""
    if not params:
        return "—"
    if isinstance(params, dict):
        return ", ".join(f"{k}={v}" for k, v in params.items())
    return str(params)


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """Write report.json and report.md into ``out_dir`` (atomically)."""
    report = {"bctkit_version": __version__, **report}
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", markdown(report))


def summary_rows(reports: dict[str, dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """One row per (allocation, model) of per-allocation reports: ``<metric> self``, ``<metric>
    cross`` (queries by the model, gallery by the old model) and ``<metric> criterion``."""
    rows: list[dict[str, Any]] = []
    for scenario, rep in reports.items():
        for name in rep["models"]:
            row: dict[str, Any] = {"allocation": scenario, "model": name}
            for m in metrics:
                row[f"{m} self"] = lookup(rep["results"], name, name, m)
                row[f"{m} cross"] = None if name == "old" else lookup(rep["results"], name, "old", m)
                info = rep.get("compatibility", {}).get(name, {}).get(m)
                row[f"{m} criterion"] = None if info is None else info["criterion"]
            rows.append(row)
    return rows


def write_summary(out: Path, reports: dict[str, dict[str, Any]], fars: list[float]) -> None:
    """Rows: per allocation old / paragon / each method; columns: 1:1 TAR@FAR and 1:N top-1 / top-5,
    each as cross (new queries vs old gallery) and self. ✓ marks the strict criterion."""
    far = min((f for f in fars if f >= 1e-4), default=max(fars))
    tar = rate_name("tar@far", far)
    metrics = [tar, "top1", "top5"]
    rows = summary_rows(reports, metrics)
    write_json(out / "summary.json", {"metrics": metrics, "rows": rows})
    header = ["allocation", "model"] + [f"{m} {side}" for m in metrics for side in ("cross", "self")]
    lines = ["# bctkit summary: all allocations", "",
             "Values in %. Cross: queries by the model, gallery by the old model; ✓ criterion met "
             "(cross > old self, strict), ✗ not met. Per-allocation details: <allocation>/report.md.", ""]
    table = []
    for row in rows:
        cells = [row["allocation"], row["model"]]
        for m in metrics:
            mark = CRITERION_MARK[row[f"{m} criterion"]]
            cross = row[f"{m} cross"]
            cells += [fmt_percent(cross) + (mark if cross is not None else ""), fmt_percent(row[f"{m} self"])]
        table.append(cells)
    values = {a: {r["model"]: (r["top1 cross"], r["top1 self"]) for r in rows
                  if r["allocation"] == a and r["model"] != "old"} for a in reports}
    old_self = {r["allocation"]: r["top1 self"] for r in rows if r["model"] == "old"}
    plot_summary(values, old_self, out / "summary_top1.png")
    lines_plot = ["", "![top-1 cross and self tests per allocation](summary_top1.png)", ""]
    write_text(out / "summary.md", "\n".join(lines + markdown_table(header, table) + lines_plot))
