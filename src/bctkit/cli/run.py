"""``bctkit run CONFIG`` and ``bctkit demo``: a run (or one per allocation scenario) from a YAML
config or a packaged one."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bctkit.engine.distributed import is_main
from bctkit.errors import ConfigError

NAMES = ("run", "demo")


def add_parser(sub: Any) -> None:
    """Register ``run`` and ``demo``."""
    run = sub.add_parser("run", help="allocate, train old and new models, evaluate, report")
    run.add_argument("config", help="YAML run configuration, or the name of a packaged one "
                     "(demo, demo-quick, demo-chain, demo-transform, synthetic-demo, synthetic-quick, "
                     "unibct-paper, "
                     "mixbct-official, bt2-paper, or a paper's recipe: bctkit recipes)")
    run.add_argument("--out", required=True, help="run directory (models, features, report)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set old.train.epochs=5 (repeatable)")
    run.add_argument("--resume", action="store_true",
                     help="reuse finished models and continue interrupted training from checkpoints")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run of another configuration found in --out (refused otherwise)")
    run.add_argument("--reuse-old-from", metavar="RUN_DIR",
                     help="copy the finished old model of RUN_DIR (same data, allocation and old config; "
                          "with --scenarios, RUN_DIR/<scenario>) instead of training one, e.g. for seeds")
    run.add_argument("--scenarios", nargs="+", metavar="SCENARIO",
                     help="run once per allocation scenario ('all' = the five) into OUT/<scenario>, "
                          "plus OUT/summary.md")
    demo = sub.add_parser("demo", help="run the packaged demo on the glyphs benchmark (characters drawn "
                                       "by installed fonts): old, independent and every seed method on the "
                                       "extended-data allocation; --full: the five allocations")
    demo.add_argument("--full", action="store_true",
                      help="the five-allocation study on twice the characters (demo-full), OUT/summary.md")
    demo.add_argument("--quick", action="store_true", help="reduced demo: l2 and bct only, fewer "
                      "identities (with --upgrade: 24 identities, about a minute; at that size rounding "
                      "decides whether the claim passes, see the README)")
    demo.add_argument("--upgrade", action="store_true",
                      help="the README's upgrade walk-through on files it writes: an arcface_torch-format "
                           "old model and a RecordIO set -> a new model with a passed certificate, its ONNX "
                           "export and a half-backfilled gallery (default --out ./bctkit-upgrade-demo)")
    demo.add_argument("--out", default="bctkit-demo",
                      help="run directory (default: ./bctkit-demo; with --upgrade ./bctkit-upgrade-demo)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--scenarios", nargs="+", metavar="SCENARIO",
                      help="allocations to run (default: extended-data; --full: all five)")
    demo.add_argument("--resume", action="store_true")
    demo.add_argument("--quiet", action="store_true")
    demo.add_argument("--overwrite", action="store_true", help="as for run")
    demo.add_argument("--reuse-old-from", metavar="RUN_DIR", help="as for run")


def run(args: argparse.Namespace) -> int:
    """Load the config (with overrides), then one run or one per scenario."""
    from bctkit.run import launch
    from bctkit.run.config import load_config, packaged_config

    if args.command == "demo" and args.upgrade:
        from bctkit.cli.demo_upgrade import run_upgrade_demo

        return run_upgrade_demo(args)
    if args.command == "run":
        path = Path(args.config)
        if not path.exists() and path.suffix == "" and len(path.parts) == 1:
            path = packaged_config(args.config)  # e.g. `bctkit run demo-chain`
    else:
        path = packaged_config("demo-quick" if args.quick else "demo-full" if args.full else "demo")
    cfg = load_config(path, args.overrides)
    scenarios = args.scenarios
    if args.command == "demo" and args.full:
        if args.quick:
            raise ConfigError("demo: --full and --quick conflict; choose one")
        scenarios = scenarios or ["all"]
    if scenarios:
        from bctkit.data.allocation import SCENARIOS

        scenarios = list(SCENARIOS) if scenarios == ["all"] else scenarios
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown:
            raise ConfigError(f"--scenarios: unknown {unknown}; expected 'all' or some of {list(SCENARIOS)}")
        launch.run_scenarios(cfg, args.out, scenarios, resume=args.resume, progress=not args.quiet,
                             reuse_old_from=args.reuse_old_from, overwrite=args.overwrite)
        if is_main():
            print(f"summary: {args.out}/summary.md")
        return 0
    report = launch.run_pipeline(cfg, args.out, resume=args.resume, progress=not args.quiet,
                                 reuse_old_from=args.reuse_old_from, overwrite=args.overwrite)
    if is_main():
        print(f"report: {args.out}/report.md ({len(report['results'])} results)")
    return 0
