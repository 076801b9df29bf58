"""What a partly backfilled gallery should deliver now: each new version's share of the items and
the top-1 a run's report predicts at that share (its random-order partial-backfill curve)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bctkit.errors import FileFormatError

__all__ = ["check_report", "expected_accuracy"]


def check_report(report: Any, where: str = "report") -> dict[str, Any]:
    """``report`` if it is a run's report.json as far as :func:`expected_accuracy` reads it (an object
    with 'models', and backfill curves of numbers), else a one-line
    :class:`~bctkit.errors.FileFormatError` naming ``where`` and what was expected."""
    def refuse(what: str) -> FileFormatError:
        return FileFormatError(f"{where}: not a run's report.json ({what})")

    if not isinstance(report, dict):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(report), "number")
        raise refuse(f"expected a JSON object with 'models' and 'backfill', got a JSON {kind}")
    models = report.get("models")
    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
        raise refuse("'models' must be an object of per-model objects")
    backfill = report.get("backfill", {})
    if not isinstance(backfill, dict):
        raise refuse("'backfill' must be an object")
    for name, orders in backfill.items():
        curve = orders.get("random") if isinstance(orders, dict) else None
        if curve is None:
            continue
        xs, ys = (curve.get(k) if isinstance(curve, dict) else None for k in ("fractions", "values"))
        if not (isinstance(xs, list) and isinstance(ys, list) and xs and len(xs) == len(ys)
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in xs + ys)):
            raise refuse(f"'backfill.{name}.random' must hold 'fractions' and 'values', lists of numbers "
                         "of one length")
    return report


def expected_accuracy(store: Any, report: Any, where: str = "report") -> list[str]:
    """For each version the report evaluated as a new model: its share of the gallery and the top-1
    the report's random-order partial-backfill curve gives at that share (linear interpolation).
    A ``report`` that is not a run's report is refused (:func:`check_report`; ``where`` names it)."""
    report = check_report(report, where)
    by_fp = {info.get("fingerprint"): name for name, info in report["models"].items()}
    total = store.count()
    lines = []
    for fp, info in store.versions().items():
        name = by_fp.get(fp)
        curve = report.get("backfill", {}).get(name or "", {}).get("random")
        if not curve or not total:
            continue
        share = info["count"] / total
        top1 = float(np.interp(share, curve["fractions"], curve["values"]))
        lines.append(f"{name}: {100 * share:.1f} % of items backfilled; expected top-1 of {name} queries "
                     f"{100 * top1:.2f} % (the report's random-order backfill curve at that share)")
    return lines
