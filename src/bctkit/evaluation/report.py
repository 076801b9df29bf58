"""Run reports: report.json (flat ``results`` records + ``models`` + ``config``) and report.md.

Record schema (kept by every extension): ``{query_model, gallery_model, metric, value, n, protocol}``.
Criterion (evaluation.md): a new model is compatible on a metric iff M(new, old) > M(old, old).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bctkit import __version__
from bctkit.storage import write_json, write_text


def lookup(records: list[dict[str, Any]], query: str, gallery: str, metric: str) -> float | None:
    for r in records:
        if r["query_model"] == query and r["gallery_model"] == gallery and r["metric"] == metric:
            return float(r["value"])
    return None


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if math.isnan(v):
        return "n/m"
    return f"{100 * v:.2f}"


def criterion(records: list[dict[str, Any]], new: str, old: str, metric: str) -> bool | None:
    """Strict criterion M(new, old) > M(old, old); None when either number is missing or NaN."""
    cross, base = lookup(records, new, old, metric), lookup(records, old, old, metric)
    if cross is None or base is None or math.isnan(cross) or math.isnan(base):
        return None
    return cross > base


def _metric_order(records: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in records:
        if r["metric"] not in seen:
            seen.append(r["metric"])
    return seen


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    records, models = report["results"], report["models"]
    old = "old"
    names = list(models)
    metrics = [m for m in _metric_order(records) if m != "auc"]
    lines = ["# bctkit report", ""]
    alloc = report.get("allocation", {})
    if alloc:
        lines += [
            f"Dataset: {report.get('dataset', '')}. Allocation **{alloc['scenario']}** "
            f"(ratio {alloc['ratio']}, seed {alloc['seed']}): old model trained on "
            f"{alloc['old_images']} images / {alloc['old_classes']} classes, new models on "
            f"{alloc['new_images']} images / {alloc['new_classes']} classes "
            f"({alloc['shared_classes']} classes shared).",
            "",
        ]
    lines += [
        "## Self and cross tests",
        "",
        "Self: queries and gallery by the same model. Cross: queries by the new model, gallery by "
        "the old model. Values in %. ✓ = criterion met (cross > old self, strict), ✗ = not met; "
        "n/m = not measurable with this many impostor pairs.",
        "",
    ]
    header = ["model"] + [f"{m} {side}" for m in metrics for side in ("self", "cross")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        row = [name]
        for m in metrics:
            row.append(_fmt(lookup(records, name, name, m)))
            if name == old:
                row.append("—")
                continue
            cross = lookup(records, name, old, m)
            ok = criterion(records, name, old, m)
            mark = "" if ok is None else (" ✓" if ok else " ✗")
            row.append(_fmt(cross) + mark)
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    protocols: dict[str, int] = {}
    for r in records:
        protocols.setdefault(r["protocol"].split(";")[0], r["n"])
    lines += ["Protocols (n = probes or pairs behind each number):", ""]
    lines += [f"- {p} (n = {n})" for p, n in protocols.items()]
    lines.append("")
    for m in [x for x in ("top1", "tar@far=1e-3") if x in metrics]:
        lines += [f"## Compatibility matrix: {m} (row = query model, column = gallery model)", ""]
        lines += ["| query \\ gallery | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for q in names:
            lines.append(f"| {q} | " + " | ".join(_fmt(lookup(records, q, g, m)) for g in names) + " |")
        lines.append("")
    lines += ["## Models", "", "| model | method | options | train images | classes | dims | fingerprint |",
              "|---|---|---|---|---|---|---|"]
    for name, info in models.items():
        compat = info.get("compat_dims")
        dims = f"{info['embedding_dim']}" + (f" (cross tests use [0:{compat}])" if compat else "")
        lines.append(
            f"| {name} | {info.get('method') or '—'} | {info.get('params') or '—'} | {info['train_images']} "
            f"| {info['num_classes']} | {dims} | `{info['fingerprint']}` |"
        )
    lines += ["", f"bctkit {__version__}. Full numbers: report.json.", ""]
    return "\n".join(lines)


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """Write report.json and report.md into ``out_dir`` (atomically)."""
    report = {"bctkit_version": __version__, **report}
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", markdown(report))
