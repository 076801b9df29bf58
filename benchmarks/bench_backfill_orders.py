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

import numpy as np

from bctkit.evaluation.compat import partial_backfill_curve
from bctkit.evaluation.protocols import EvalProtocol
from bctkit.features import load_features
from bctkit.models.transformation import load_transformation
from bctkit.run.config import load_config, packaged_config
from bctkit.run.launch import run_pipeline
from bctkit.run.transforms import folder_name


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


def random_spread(run: Path, name: str, target: str, seeds: int, gallery_per_class: int) -> dict:
    """The random order's area over ``seeds`` seeds, and the uncertainty order's recomputed."""
    feats = {n: load_features(run / "features" / f"{n}.safetensors") for n in ("old", target, name)}
    labels = feats["old"].labels
    g, p = EvalProtocol("eval", labels, gallery_per_class, (), (1,)).split()
    t, h = feats[target].feats, feats[name].feats
    _, log_var = load_transformation(run / "models" / folder_name(name)).apply(feats["old"].feats)

    def area(order: str, seed: int = 0) -> float:
        return partial_backfill_curve(t[p], h[g], t[g], labels[g], labels[p], order=order, seed=seed,
                                      uncertainty=None if log_var is None else log_var[g.numpy()])[2]

    rnd = np.array([area("random", s) for s in range(seeds)])
    out = {"seeds": seeds, "random_mean": float(rnd.mean()), "random_std": float(rnd.std(ddof=1)),
           "random_max": float(rnd.max())}
    if log_var is not None:
        out["uncertainty"] = area("uncertainty")
        gap = out["uncertainty"] - out["random_mean"]
        out["uncertainty_minus_random_mean_in_std"] = gap / out["random_std"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished demo-transform run directory")
    ap.add_argument("--seeds", type=int, default=20, help="random-order seeds (default 20)")
    args = ap.parse_args()
    if args.run is None:
        args.run = Path(tempfile.mkdtemp(prefix="bench-orders-"))
        run_pipeline(load_config(packaged_config("demo-transform")), args.run, resume=True, progress=False)
    report = json.loads((args.run / "report.json").read_text())
    galleries = areas(report)
    per_class = report["config"]["evaluation"]["gallery_per_class"]
    for name, entry in galleries.items():
        entry["random_seeds"] = random_spread(args.run, name, entry["target"], args.seeds, per_class)
    print(json.dumps({"benchmark": "backfill orders from a transformed gallery (glyphs demo)",
                      "metric": "top1", "unit": "class", "run": str(args.run), "galleries": galleries}))


if __name__ == "__main__":
    main()
