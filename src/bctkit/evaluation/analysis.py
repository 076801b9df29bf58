"""Compatibility analysis of a run's records: criterion, update gain, matrices, partial backfill
curves, and the plots that go with them (evaluation.md, "Compatibility report")."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from bctkit.evaluation.compat import (
    BACKFILL_ORDER_NAMES,
    ORDERS,
    TRANSFORM_ORDER_NAMES,
    chain_metrics,
    compatibility_matrix,
    criterion,
    partial_backfill_curve,
    update_gain,
)
from bctkit.evaluation.plots import model_styles, plot_backfill, plot_cmc, plot_matrix, plot_roc
from bctkit.evaluation.protocols import EvalProtocol, PairResult, comparable
from bctkit.features import FeatureSet


def _values(records: list[dict[str, Any]], metric: str) -> dict[tuple[str, str], float]:
    return {(r["query_model"], r["gallery_model"]): float(r["value"])
            for r in records if r["metric"] == metric}


def compatibility_summary(
    records: list[dict[str, Any]], names: list[str], old: str = "old", paragon: str | None = "paragon"
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per new model and metric: cross M(n, o), self M(n, n), old self M(o, o), strict criterion
    M(n, o) > M(o, o) and BCT Eq. 9 update gain (only where the criterion holds)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    metrics = list(dict.fromkeys(r["metric"] for r in records))
    for metric in metrics:
        vals = _values(records, metric)
        base = vals.get((old, old), math.nan)
        par = vals.get((paragon, paragon), math.nan) if paragon else math.nan
        for name in names:
            if name == old:
                continue
            cross = vals.get((name, old), math.nan)
            met = bool(cross > base)
            gain = update_gain(cross, base, par) if met and not math.isnan(par) else None
            out.setdefault(name, {})[metric] = {
                "cross": cross, "self": vals.get((name, name), math.nan), "old_self": base,
                "criterion": met, "update_gain": gain,
            }
    return out


def transform_summary(records: list[dict[str, Any]], transforms: dict[str, dict[str, Any]],
                      old: str = "old") -> dict[str, dict[str, Any]]:
    """Per transformation h and metric: the old self test M(o, o), the cross test of the target's
    queries on the transformed gallery M(t, h), the target's self test M(t, t), the criterion
    M(t, h) > M(o, o) (strict) and the share of the old-to-new gap h recovers without re-embedding,
    (M(t, h) - M(o, o)) / (M(t, t) - M(o, o)) (None where the target does not beat the old model)."""
    out: dict[str, dict[str, Any]] = {}
    by_metric = {m: _values(records, m) for m in dict.fromkeys(r["metric"] for r in records)}
    for name, how in transforms.items():
        target = how["target"]
        entry: dict[str, Any] = {"target": target, "metrics": {}}
        for metric, vals in by_metric.items():
            if (target, name) not in vals:
                continue
            cross, base = vals[(target, name)], vals.get((old, old), math.nan)
            top = vals.get((target, target), math.nan)
            entry["metrics"][metric] = {
                "cross": cross, "old_self": base, "target_self": top,
                "self": vals.get((name, name), math.nan),
                "criterion": bool(cross > base),
                "recovered": float((cross - base) / (top - base)) if top > base else None,
            }
        out[name] = entry
    return out


def matrices(records: list[dict[str, Any]], names: list[str], metrics: list[str]) -> dict[str, Any]:
    """N x N matrices (row = query model, column = gallery model; NaN = not comparable)."""
    out = {}
    for metric in metrics:
        m, _ = compatibility_matrix(_values(records, metric), names)
        out[metric] = {"models": names, "values": [[None if math.isnan(v) else v for v in row] for row in m]}
    return out


def chain_summary(records: list[dict[str, Any]], chain: list[str], metrics: list[str]) -> dict[str, Any]:
    """AC (strict), AM (mean of M[i][j], i > j), BC and FC (CL2R) of the models in ``chain`` order,
    oldest first, for each metric; with the chain's matrix and, for every pair i > j, whether the
    criterion M[i][j] > M[j][j] holds."""
    out: dict[str, Any] = {"models": chain}
    for metric in metrics:
        m, _ = compatibility_matrix(
            {k: v for k, v in _values(records, metric).items() if k[0] in chain and k[1] in chain}, chain
        )
        n = len(chain)
        marks = [[criterion(m, i, j) if i > j else None for j in range(n)] for i in range(n)]
        values = [[None if math.isnan(v) else float(v) for v in row] for row in m]
        out[metric] = {**chain_metrics(m), "matrix": values, "criterion": marks}
    return out


def backfill_curves(
    features: dict[str, FeatureSet], protocol: EvalProtocol, old: str = "old", seed: int = 0,
    transforms: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Top-1 of new-model probes as a growing fraction of gallery classes is re-embedded with the
    new model, for random (seeded), distance (largest old/new change first) and benefit orders; and
    for each transformation h of ``transforms`` (name -> {"target", "log_var"}), from the gallery
    h(old) to the target's own, in random, benefit and (with FastFill's log sigma^2) uncertainty
    orders."""
    g_idx, p_idx = protocol.split()
    labels = protocol.labels
    old_fs = features[old]
    transforms = transforms or {}
    out: dict[str, dict[str, Any]] = {}
    for name, how in transforms.items():
        target, h = features[how["target"]], features[name]
        log_var = how.get("log_var")
        orders = [o for o in TRANSFORM_ORDER_NAMES if o != "uncertainty" or log_var is not None]
        curves = {}
        for order in orders:
            fr, vals, area = partial_backfill_curve(
                target.feats[p_idx], h.feats[g_idx], target.feats[g_idx], labels[g_idx], labels[p_idx],
                metric="top1", by="class", order=order, seed=seed,
                uncertainty=None if log_var is None else log_var[g_idx],
            )
            curves[order] = {"fractions": fr.tolist(), "values": vals.tolist(), "area": area}
        out[name] = {
            "metric": "top1", "by": "class", "area_rule": "trapezoid over p", "seed": seed,
            "from": name, "model": how["target"],
            "protocol": f"1:N closed-set top-1, {len(p_idx)} probes by {how['target']}, gallery of "
                        f"{len(g_idx)} images transformed by {name}, partly re-embedded by {how['target']}",
            **curves,
        }
    for name, fs in features.items():
        if name == old or name in transforms:
            continue
        view = comparable(fs, old_fs)
        if view is None:
            continue
        q_cross, _, dims = view
        curves = {}
        for order in BACKFILL_ORDER_NAMES:
            fr, vals, area = partial_backfill_curve(
                fs.feats[p_idx], old_fs.feats[g_idx], fs.feats[g_idx], labels[g_idx], labels[p_idx],
                metric="top1", by="class", order=order, seed=seed, query_cross=q_cross[p_idx],
            )
            curves[order] = {"fractions": fr.tolist(), "values": vals.tolist(), "area": area}
        out[name] = {
            "metric": "top1", "by": "class", "area_rule": "trapezoid over p", "seed": seed,
            "protocol": f"1:N closed-set top-1, {len(p_idx)} probes by {name}, gallery of "
                        f"{len(g_idx)} images partly re-embedded by {name} ({dims} vs old items)",
            **curves,
        }
    return out


def write_plots(
    out_dir: Path, pairs: dict[tuple[str, str], PairResult], names: list[str], mats: dict[str, Any],
    backfill: dict[str, dict[str, Any]], old: str = "old",
) -> list[str]:
    """roc.png, cmc.png, matrix_<metric>.png and backfill.png; returns the file names written."""
    keys = [(old, old)] + [k for n in names if n != old for k in ((n, n), (n, old)) if k in pairs]
    label = {k: f"{k[0]} / {k[1]} ({'self' if k[0] == k[1] else 'cross'})" for k in keys}
    colour = model_styles(names)  # a model has one colour in every figure; cross tests are dashed
    styles = {label[k]: {"color": colour[k[0]], "linestyle": "-" if k[0] == k[1] else "--"} for k in keys}
    written = []
    rocs = {label[k]: pairs[k].roc for k in keys if pairs[k].roc is not None}
    if rocs:
        plot_roc(rocs, out_dir / "roc.png", title="1:1 verification ROC (query / gallery model)",
                 styles=styles)
        written.append("roc.png")
    cmcs = {label[k]: pairs[k].cmc for k in keys if pairs[k].cmc}
    if cmcs:
        plot_cmc(cmcs, out_dir / "cmc.png", title="1:N closed-set CMC (query / gallery model)", styles=styles)
        written.append("cmc.png")
    for metric, mat in mats.items():
        fname = f"matrix_{metric.replace('@', '_at_').replace('=', '')}.png"
        values = np.array([[np.nan if v is None else v for v in row] for row in mat["values"]])
        plot_matrix(100 * values, mat["models"], out_dir / fname, title=f"{metric} (%)", fmt="{:.1f}")
        written.append(fname)
    if backfill:
        curves = {f"{n} ({order})": (b[order]["fractions"], b[order]["values"])
                  for n, b in backfill.items() for order in ORDERS if order in b}
        dashes = {"random": "-", "distance": ":", "benefit": "--", "uncertainty": "-."}
        lines = {f"{n} ({order})": {"color": colour.get(n, "black"), "linestyle": dashes[order]}
                 for n in backfill for order in ORDERS}
        plot_backfill(curves, out_dir / "backfill.png", title="Partial backfill by class", ylabel="top-1",
                      styles=lines)
        written.append("backfill.png")
    return written
