"""Command line: ``bctkit run``, ``bctkit demo``, ``bctkit evaluate``, ``bctkit aggregate``,
``bctkit export``, ``bctkit methods``, ``bctkit certificate verify``. Errors: one line, exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from bctkit.engine.distributed import close_process_group, is_distributed, is_main, rank
from bctkit.errors import BctkitError, ConfigError


class _Parser(argparse.ArgumentParser):
    """argparse with bctkit's error form: one line on stderr, exit 2 (argparse's own prints the usage
    block first). Subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bctkit", description="Backward-compatible embedding training.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="allocate, train old and new models, evaluate, report")
    run.add_argument("config", help="YAML run configuration, or the name of a packaged one "
                     "(demo, demo-quick, demo-chain, synthetic-demo, synthetic-quick, unibct-paper, "
                     "mixbct-official, bt2-paper)")
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
    demo.add_argument("--quick", action="store_true", help="reduced demo: l2 and bct only, fewer identities")
    demo.add_argument("--out", default="bctkit-demo", help="run directory (default: ./bctkit-demo)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--scenarios", nargs="+", metavar="SCENARIO",
                      help="allocations to run (default: extended-data; --full: all five)")
    demo.add_argument("--resume", action="store_true")
    demo.add_argument("--quiet", action="store_true")
    demo.add_argument("--overwrite", action="store_true", help="as for run")
    demo.add_argument("--reuse-old-from", metavar="RUN_DIR", help="as for run")
    from bctkit.evaluation.cli import add_parser as add_evaluate

    add_evaluate(sub)
    agg = sub.add_parser("aggregate", help="combine repeated all-allocation runs (seeds): mean ± sd, "
                                           "criterion per run and on the means")
    agg.add_argument("runs", nargs="+", help="all-allocation run directories, e.g. one per seed")
    agg.add_argument("--out", required=True, help="directory for aggregate.md and aggregate.json")
    agg.add_argument("--split", choices=["test", "validation"], default="test",
                     help="which reports to combine: the test identities' (default) or those of runs "
                          "made with --set evaluation.split=validation (RUN_DIR/<scenario>/validation)")
    exp = sub.add_parser("export", help="export a model's embedding network (no classifier head) for "
                                        "serving, checked against the model, with a JSON card")
    exp.add_argument("model", help="bctkit model file (RUN/models/<name>/model.safetensors) or its folder")
    exp.add_argument("--format", required=True, metavar="FORMAT",
                     help="onnx (needs pip install bctkit[onnx]), torchscript or safetensors (weights only)")
    exp.add_argument("--out", required=True, help="folder for the exported file and card.json")
    xt = sub.add_parser("extract", help="embed every image of a dataset with a saved model into a feature "
                                        "file (row keys included; resumable; torchrun splits the work)")
    xt.add_argument("model", help="bctkit model (RUN/models/<name>/ or its model.safetensors) or a bctkit "
                                  "export (its folder, or model.pt / model.onnx / embedding.safetensors)")
    xt.add_argument("data", help="image folder (root/<identity>/<image>), 'path label' list file, or "
                                 "RecordIO folder (train.rec + train.idx)")
    xt.add_argument("--out", required=True, help="feature file to write (.safetensors)")
    xt.add_argument("--flip", action="store_true", help="add the features of the mirrored images (flip test)")
    xt.add_argument("--batch-size", type=int, default=256)
    xt.add_argument("--workers", type=int, help="DataLoader workers (default: the usable CPUs, at most 8)")
    xt.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    xt.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    xt.add_argument("--chunk-batches", type=int, default=64,
                    help="batches per resumable chunk (a rerun after a kill continues from the last one)")
    xt.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("methods", help="list the compatibility methods and their options")
    cert = sub.add_parser("certificate", help="check compatibility certificates (RUN/certificates/*.json)")
    cert_sub = cert.add_subparsers(dest="certificate_command", required=True)
    verify = cert_sub.add_parser("verify", help="verify certificate files: exit 0 if all verify, 2 otherwise")
    verify.add_argument("files", nargs="+", metavar="FILE")
    from bctkit.gallery.cli import add_parser as add_gallery

    add_gallery(sub)
    return p


def _run(args: argparse.Namespace) -> int:
    from bctkit.config import load_config, packaged_config
    from bctkit.pipeline import run_pipeline

    if args.command == "methods":
        from bctkit.losses.base import available_methods, method_class

        for name in available_methods():
            if name == "independent":  # the paragon every run trains; not a method to list in configs
                continue
            params = method_class(name).Params.model_fields
            opts = ", ".join(f"{k}={v.default!r}" for k, v in params.items()) or "no options"
            print(f"{name}: {opts}")
        return 0
    if args.command == "evaluate":
        from bctkit.evaluation.cli import run as run_evaluate

        return run_evaluate(args)
    if args.command == "extract":
        return _extract(args)
    if args.command == "certificate":
        return _verify_certificates(args.files)
    if args.command == "gallery":
        from bctkit.gallery.cli import run as run_gallery

        return run_gallery(args)
    if args.command == "export":
        from bctkit.export import export_model
        from bctkit.storage import read_json

        files = export_model(args.model, args.format, args.out)
        check = read_json(files.card)["exports"][args.format]["check"]
        print(f"export: {files.file} (max abs difference from the model {check['max_abs_diff']:.2g}); "
              f"card: {files.card}")
        return 0
    if args.command == "aggregate":
        from bctkit.evaluation.aggregate import aggregate, load_run, write_aggregate

        summaries = [load_run(Path(r), args.split) for r in args.runs]
        write_aggregate(Path(args.out), aggregate(summaries, args.runs))
        print(f"aggregate: {args.out}/aggregate.md ({len(args.runs)} runs)")
        return 0
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
        from bctkit.pipeline import run_scenarios

        scenarios = list(SCENARIOS) if scenarios == ["all"] else scenarios
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown:
            raise ConfigError(f"--scenarios: unknown {unknown}; expected 'all' or some of {list(SCENARIOS)}")
        run_scenarios(cfg, args.out, scenarios, resume=args.resume, progress=not args.quiet,
                      reuse_old_from=args.reuse_old_from, overwrite=args.overwrite)
        if is_main():
            print(f"summary: {args.out}/summary.md")
        return 0
    report = run_pipeline(cfg, args.out, resume=args.resume, progress=not args.quiet,
                          reuse_old_from=args.reuse_old_from, overwrite=args.overwrite)
    if is_main():
        print(f"report: {args.out}/report.md ({len(report['results'])} results)")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from bctkit.data.workers import auto_workers
    from bctkit.extract import extract_to_file

    workers = auto_workers() if args.workers is None else args.workers
    out = extract_to_file(args.model, args.data, args.out, batch_size=args.batch_size, workers=workers,
                          flip=args.flip, device=args.device, precision=args.precision,
                          chunk_batches=args.chunk_batches, progress=not args.quiet)
    if is_main():
        print(f"extract: {out}")
    return 0


def _verify_certificates(files: list[str]) -> int:
    """One line per certificate file: OK with what it certifies, or the error; 0 if all verify, else 2."""
    from bctkit.certificate import CertificateError, describe, verify_certificate

    failed = 0
    for path in files:
        try:
            print(f"OK {path}: {describe(verify_certificate(path))}")
        except CertificateError as exc:
            failed += 1
            print(f"FAILED {exc}")
    return 2 if failed else 0


def _where() -> str:
    """'rank N: ' under several processes (each rank may fail on its own share), else ''."""
    return f"rank {rank()}: " if is_distributed() else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Under torchrun every process runs this; a failing rank prints its one-line error and exits 2,
    and torchrun then stops the other ranks (none waits forever on a collective)."""
    args = _parser().parse_args(argv)
    try:
        code = _run(args)
        close_process_group()
        return code
    except BctkitError as exc:
        print(f"bctkit: error: {_where()}{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"bctkit: error: {_where()}{exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bctkit: interrupted; rerun with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
