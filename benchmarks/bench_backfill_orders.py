"""How fast each backfill order recovers new-model accuracy from a transformed gallery, on the glyphs
demo: the areas under the partial-backfill curves (top-1 of the target's probes against the share
of gallery classes re-embedded, starting from h(old)) in random, benefit and FastFill's uncertainty
orders, from a ``bctkit run demo-transform`` report. Prints one JSON line: each order's area and
p = 0 / 0.5 / 1 values, and ``ratio`` = uncertainty area / random area (> 1: backfilling the most
uncertain items first pays).

Usage: python benchmarks/bench_backfill_orders.py --run RUN_DIR   (a finished demo-transform run;
       without --run the run is made in a temporary folder first: about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bctkit.run.config import load_config, packaged_config
from bctkit.run.launch import run_pipeline


def areas(report: dict) -> dict:
    """One entry per transformed gallery: each order's area and its curve's ends and middle."""
    out = {}
    for name in report.get("transforms", {}):
        b = report["backfill"][name]
        orders = {o: {"area": b[o]["area"], "p0": b[o]["values"][0],
                      "p0.5": b[o]["values"][len(b[o]["values"]) // 2], "p1": b[o]["values"][-1]}
                  for o in ("random", "benefit", "uncertainty") if o in b}
        ratio = orders["uncertainty"]["area"] / orders["random"]["area"] if "uncertainty" in orders else None
        out[name] = {"target": b["model"], "orders": orders, "ratio": ratio}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished demo-transform run directory")
    args = ap.parse_args()
    if args.run is None:
        args.run = Path(tempfile.mkdtemp(prefix="bench-orders-"))
        run_pipeline(load_config(packaged_config("demo-transform")), args.run, resume=True, progress=False)
    report = json.loads((args.run / "report.json").read_text())
    print(json.dumps({"benchmark": "backfill orders from a transformed gallery (glyphs demo)",
                      "metric": "top1", "unit": "class", "run": str(args.run), "galleries": areas(report)}))


if __name__ == "__main__":
    main()
