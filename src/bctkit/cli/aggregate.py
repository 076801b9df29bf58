"""``bctkit aggregate RUN...``: repeated all-allocation runs (seeds) combined, mean ± sd."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

NAMES = ("aggregate",)


def add_parser(sub: Any) -> None:
    """Register ``aggregate``."""
    agg = sub.add_parser("aggregate", help="combine repeated all-allocation runs (seeds): mean ± sd, "
                                           "criterion per run and on the means")
    agg.add_argument("runs", nargs="+", help="all-allocation run directories, e.g. one per seed")
    agg.add_argument("--out", required=True, help="directory for aggregate.md and aggregate.json")
    agg.add_argument("--split", choices=["test", "validation"], default="test",
                     help="which reports to combine: the test identities' (default) or those of runs "
                          "made with --set evaluation.split=validation (RUN_DIR/<scenario>/validation)")


def run(args: argparse.Namespace) -> int:
    from bctkit.run.aggregate import aggregate, load_run, write_aggregate

    summaries = [load_run(Path(r), args.split) for r in args.runs]
    write_aggregate(Path(args.out), aggregate(summaries, args.runs))
    print(f"aggregate: {args.out}/aggregate.md ({len(args.runs)} runs)")
    return 0
