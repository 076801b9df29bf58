"""What a partly backfilled gallery should deliver now: each new version's share of the items and
the top-1 a run's report predicts at that share, from the report's partial-backfill curve of the
order the store's backfill used (after ``gallery transform``, the curve from the transformed
gallery h(old) to that version). Only for searches the store allows: a version whose queries the
store refuses (no passed certificate for another version's items) gets a line saying so instead."""

from __future__ import annotations

from typing import Any

import numpy as np

from bctkit.errors import FileFormatError
from bctkit.gallery.search import search_blocker

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
        if not isinstance(orders, dict):
            raise refuse(f"'backfill.{name}' must be an object of curves by order")
        for order, curve in orders.items():
            if isinstance(curve, str | int | float) and not isinstance(curve, bool):
                continue  # what the curves measure: 'metric', 'by', 'protocol', 'seed', ...
            xs, ys = (curve.get(k) if isinstance(curve, dict) else None for k in ("fractions", "values"))
            if not (isinstance(xs, list) and isinstance(ys, list) and xs and len(xs) == len(ys)
                    and all(isinstance(v, int | float) and not isinstance(v, bool) for v in xs + ys)):
                raise refuse(f"'backfill.{name}.{order}' must hold 'fractions' and 'values', lists of "
                             "numbers of one length")
    return report


def expected_accuracy(store: Any, report: Any, where: str = "report") -> list[str]:
    """For each version holding items that the report evaluated as a new model: its share of the
    gallery and the top-1 the report's partial-backfill curve of the order the store's backfill used
    gives at that share (linear interpolation); a line without a prediction where the store refuses
    that version's queries, where the store recorded no single order or the report has no curve of
    it. A ``report`` that is not a run's report is refused (:func:`check_report`; ``where`` names it)."""
    report = check_report(report, where)
    by_fp = {info.get("fingerprint"): name for name, info in report["models"].items()}
    total = store.count()
    used = store.backfill_orders()
    versions = store.versions()
    transforms = report.get("transforms") if isinstance(report.get("transforms"), dict) else {}
    # a backfill after `gallery transform` starts from h(old): its curves are h(old)'s, by target
    after = {t.get("target"): name for fp, name in by_fp.items() if (t := transforms.get(name))
             and isinstance(t, dict) and fp in versions}
    lines = []
    for fp, info in versions.items():
        name = by_fp.get(fp)
        if name in transforms:  # the transformed items themselves: not a backfill's share
            continue
        source = after.get(name, name)
        curves = {order: curve for order, curve in report.get("backfill", {}).get(source or "", {}).items()
                  if isinstance(curve, dict)}
        if not curves or not total or not info["count"]:
            continue
        share = info["count"] / total
        head = f"{name}: {100 * share:.1f} % of items backfilled; "
        blocked = search_blocker(store, fp)
        orders = used.get(fp, [])
        if blocked is not None:
            lines.append(f"{head}the store refuses {name} queries (no passed certificate for the "
                         f"{blocked.count} items of {blocked.label}): no expected top-1")
        elif len(orders) != 1:
            told = "no backfill order" if not orders else f"backfills in several orders ({', '.join(orders)})"
            lines.append(f"{head}the store records {told} for {name}: no expected top-1")
        elif orders[0] not in curves:
            lines.append(f"{head}the report has no {orders[0]}-order backfill curve (it has "
                         f"{', '.join(curves)}): no expected top-1")
        else:
            curve = curves[orders[0]]
            top1 = float(np.interp(share, curve["fractions"], curve["values"]))
            start = "" if source == name else f" from {source}"
            lines.append(f"{head}expected top-1 of {name} queries {100 * top1:.2f} % (the report's "
                         f"{orders[0]}-order backfill curve{start} at that share)")
    return lines
