"""Command line: ``bctkit run``, ``bctkit demo``, ``bctkit methods``. Errors: one line, exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bctkit.errors import BctkitError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bctkit", description="Backward-compatible embedding training.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="allocate, train old and new models, evaluate, report")
    run.add_argument("config", help="YAML run configuration")
    run.add_argument("--out", required=True, help="run directory (models, features, report)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set old.train.epochs=5 (repeatable)")
    run.add_argument("--resume", action="store_true",
                     help="reuse finished models and continue interrupted training from checkpoints")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    demo = sub.add_parser("demo", help="run the packaged demo on the embedded synthetic dataset")
    demo.add_argument("--quick", action="store_true", help="reduced demo (under 5 minutes on 2 cores)")
    demo.add_argument("--out", default="bctkit-demo", help="run directory (default: ./bctkit-demo)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--resume", action="store_true")
    demo.add_argument("--quiet", action="store_true")
    sub.add_parser("methods", help="list the compatibility methods and their options")
    return p


def _run(args: argparse.Namespace) -> int:
    from bctkit.config import load_config, packaged_config
    from bctkit.pipeline import run_pipeline

    if args.command == "methods":
        from bctkit.losses.base import available_methods, method_class

        for name in available_methods():
            params = method_class(name).Params.model_fields
            opts = ", ".join(f"{k}={v.default!r}" for k, v in params.items()) or "no options"
            print(f"{name}: {opts}")
        return 0
    path = args.config if args.command == "run" else packaged_config("demo-quick" if args.quick else "demo")
    cfg = load_config(path, args.overrides)
    report = run_pipeline(cfg, args.out, resume=args.resume, progress=not args.quiet)
    print(f"report: {args.out}/report.md ({len(report['results'])} results)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except BctkitError as exc:
        print(f"bctkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bctkit: interrupted; rerun with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
