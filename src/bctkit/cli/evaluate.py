"""``bctkit evaluate``: the command-line face of evaluation (argument parsing and printing only).

Two forms. ``--protocol split`` (the default) evaluates saved feature files of one labelled image set
with the run's own split. ``--protocol ijbb | ijbc | pairs | retrieval | market | loo | roxford | rparis
| gldv2 --data ...`` evaluates models or feature files on a test set read from disk
(:mod:`bctkit.evaluation.testset`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bctkit.engine.distributed import is_main
from bctkit.errors import ConfigError
from bctkit.evaluation.testset import PROTOCOLS

SPLIT_TESTS = ("identification", "verification", "retrieval")
TEST_SETS = tuple(PROTOCOLS)
OPTIONS: dict[str, tuple[tuple[str, ...], Any]] = {
    "fars": (("split", "ijbb", "ijbc", "pairs"), None),
    "fpirs": (("split", "ijbb", "ijbc"), None),
    "topk": (("split", "ijbb", "ijbc", "retrieval", "market", "loo"), None),
    "gallery_per_class": (("split",), 1),
    "tests": (("split",), ["all"]),
    "no_backfill": (("split",), False),
    "flip": (TEST_SETS, False),
    "batch_size": (TEST_SETS, 256),
    "workers": (TEST_SETS, None),
    "device": (TEST_SETS, "auto"),
    "precision": (TEST_SETS, "fp32"),
    "tar_mode": (("ijbb", "ijbc", "pairs"), "exact"),
    "score_weighting": (("ijbb", "ijbc"), False),
    "folds": (("pairs",), 10),
    "block": (("retrieval", "market", "loo", "roxford", "rparis", "gldv2"), 1024),
    "index": (("retrieval", "market"), None),
    "nprobe": (("retrieval", "market"), None),
    "query_folder": (("market",), "query"),
    "ap": (("market",), "mean"),
}
"""Option (argparse dest) -> (the protocols it belongs to, its default). Every option here is parsed
with default None, so one given on the command line, even at its default value, is told apart from
one left out: given to another protocol it is refused, left out it takes the default."""


NAMES = ("evaluate",)


def add_parser(sub: Any) -> None:
    """Register ``evaluate`` on the CLI's subparsers."""
    ev = sub.add_parser("evaluate", help="evaluate models or feature files: the run's split of one image "
                                         "set, or a test set (IJB-B/C, pair .bin, query/gallery, Market, "
                                         "leave-one-out, ROxford/RParis, GLDv2)")
    ev.add_argument("--protocol", default="split", choices=["split", *PROTOCOLS],
                    help="split (default): feature files of one labelled image set, the first images of "
                         "each identity as the gallery; "
                         + "; ".join(f"{k}: {v}" for k, v in PROTOCOLS.items()))
    ev.add_argument("--data", nargs="+", metavar="PATH", help="the test set's files (see --protocol)")
    ev.add_argument("--old", required=True,
                    help="the old model (the gallery side): a feature file, or with a test-set protocol "
                         "also a model (a run's model, an imported model, an export)")
    ev.add_argument("--new", action="append", required=True, metavar="[NAME=]PATH",
                    help="a new model or its feature file (repeatable); NAME defaults to the model's name")
    ev.add_argument("--paragon", help="an independently trained new model or its features (update gain)")
    ev.add_argument("--out", required=True, help="directory for report.md, report.json, plots, certificates")
    ev.add_argument("--fars", type=float, nargs="+",
                    help="TAR@FAR rates (split, ijbb/ijbc, pairs; default per protocol: split 1e-5 ... 1e-2, "
                         "ijbb/ijbc 1e-6 ... 1e-1, pairs 1e-3 1e-2)")
    ev.add_argument("--fpirs", type=float, nargs="+",
                    help="TPIR@FPIR rates (split, ijbb/ijbc; default 1e-2 1e-1)")
    ev.add_argument("--topk", type=int, nargs="+",
                    help="CMC ranks (split, loo default 1 5; ijbb/ijbc, retrieval, market default 1 5 10)")
    ev.add_argument("--chain", action="store_true",
                    help="the models form a chain of upgrades: --old, then each --new in order "
                         "(AC, AM, BC, FC in the report)")
    split = ev.add_argument_group("--protocol split")
    split.add_argument("--gallery-per-class", type=int,
                       help="1:N gallery = the first N images of each identity, in file order (default 1)")
    split.add_argument("--tests", nargs="+", choices=["all", *SPLIT_TESTS],
                       help="what to evaluate: 1:N identification (CMC, TPIR@FPIR), 1:1 verification "
                            "(TAR@FAR, AUC), retrieval (mAP, mAP@R); default all")
    split.add_argument("--no-backfill", action="store_true", default=None,
                       help="skip partial-backfill curves")
    tests = ev.add_argument_group("test-set protocols (each option names the protocols it applies to; "
                                  "given to another protocol it is refused)")
    tests.add_argument("--flip", action="store_true", default=None,
                       help="models: add the mirrored images' features (not with feature files: their "
                            "features are already extracted)")
    tests.add_argument("--batch-size", type=int, help="models: images per batch (default 256)")
    tests.add_argument("--workers", type=int, help="DataLoader workers (default: the usable CPUs, at most 8)")
    tests.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    tests.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default fp32")
    tests.add_argument("--tar-mode", choices=["exact", "insightface"],
                       help="ijbb/ijbc, pairs: TAR@FAR rule, exact (default: the threshold never lets the "
                            "FAR exceed the target) or insightface (TPR of the ROC point nearest the FAR, "
                            "as insightface's IJB tables)")
    tests.add_argument("--score-weighting", action="store_true", default=None,
                       help="ijbb/ijbc: weight each image by its detector score before pooling")
    tests.add_argument("--folds", type=int, help="pairs: folds of the k-fold accuracy (default 10)")
    tests.add_argument("--block", type=int, help="retrieval, market, loo, roxford, rparis, gldv2: query rows "
                                                 "per block (default 1024)")
    tests.add_argument("--index", help="retrieval/market: a FAISS factory string (e.g. IVF1024,Flat, "
                                       "HNSW32) for top-k, reported with its recall against exact search")
    tests.add_argument("--nprobe", type=int, help="retrieval/market: nprobe of an IVF --index")
    tests.add_argument("--query-folder", choices=["query", "gt_bbox"], help="market: the query folder "
                                                                            "(default query)")
    tests.add_argument("--ap", choices=["mean", "trapezoid"],
                       help="market: AP rule, mean (default: mean precision at each hit) or trapezoid (the "
                            "Market-1501 MATLAB code's: mean of the precision just before and at each hit)")
    tests.add_argument("--quiet", action="store_true", help="no progress bars")


def _rates(args: argparse.Namespace) -> None:
    for name in ("fars", "fpirs"):
        values = getattr(args, name) or []
        if any(not 0 < f < 1 for f in values):
            raise ConfigError(f"--{name} must lie in (0, 1), got {values}")


def _named(args: argparse.Namespace, default_name: Any) -> dict[str, str]:
    """name -> path: old, paragon, then each --new (NAME= or ``default_name(path)``)."""
    paths: dict[str, str] = {"old": args.old}
    if args.paragon:
        paths["paragon"] = args.paragon
    for item in args.new:
        name, sep, file = item.partition("=")
        if not sep:
            file, name = item, default_name(item)
        if name in paths:
            raise ConfigError(f"--new {item}: model name {name!r} used twice; write NAME=PATH")
        paths[name] = file
    return paths


def _check_options(args: argparse.Namespace) -> None:
    """Refuse an option of another protocol (:data:`OPTIONS`), then fill in the defaults of those left
    out."""
    for dest, (protocols, default) in OPTIONS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
        elif args.protocol not in protocols:
            where = ("a test-set --protocol (" + ", ".join(TEST_SETS) + ")" if protocols == TEST_SETS else
                     "--protocol " + " or ".join(filter(None, [", ".join(protocols[:-1]), protocols[-1]])))
            raise ConfigError(f"--{dest.replace('_', '-')} applies only to {where}, not to --protocol "
                              f"{args.protocol}")


def run(args: argparse.Namespace) -> int:
    """Run ``bctkit evaluate`` (exit code 0; errors raise)."""
    _rates(args)
    _check_options(args)
    if args.protocol == "split":
        return _split(args)
    from bctkit.data.workers import auto_workers
    from bctkit.evaluation.testset import ExtractOptions, TestSetOptions, build_protocol, evaluate_testset

    if not args.data:
        raise ConfigError(f"--protocol {args.protocol} needs --data ({PROTOCOLS[args.protocol]})")
    given = {k: tuple(v) for k in ("fars", "fpirs", "topk") if (v := getattr(args, k))}
    opts = TestSetOptions(**given, score_weighting=args.score_weighting, folds=args.folds, block=args.block,
                          index=args.index, nprobe=args.nprobe, query_folder=args.query_folder,
                          tar_mode=args.tar_mode, ap=args.ap)
    protocol = build_protocol(args.protocol, args.data, opts)
    if is_main():
        for caveat in protocol.caveats():
            print(f"warning: {caveat}", file=sys.stderr)
    models = _named(args, _model_name)
    ex = ExtractOptions(args.flip, args.batch_size, auto_workers() if args.workers is None else args.workers,
                        args.device, args.precision)
    out = Path(args.out)
    chain = [n for n in models if n != "paragon"] if args.chain else None
    report = evaluate_testset(protocol, models, out, ex, chain=chain, progress=not args.quiet,
                              log=None if args.quiet else print, data=args.data)
    if is_main() and report is not None:
        print(f"report: {out}/report.md ({len(report['results'])} results)")
    return 0


def _model_name(path: str) -> str:
    """A model's default report name: its folder for a run's or an export's model, else the stem."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().name
    if p.name in ("model.safetensors", "model.pt", "model.onnx", "embedding.safetensors"):
        return p.resolve().parent.name
    return p.stem


def _split(args: argparse.Namespace) -> int:
    """Feature files of one labelled image set, the run's own split."""
    import torch

    from bctkit.evaluation.protocols import EvalProtocol, check_comparable
    from bctkit.evaluation.suite import evaluate_suite, load_feature_files, models_info_from_features
    from bctkit.features import load_features

    if args.data:
        raise ConfigError("--data is for the test-set protocols; --protocol split reads only feature files")
    paths = {k: Path(v) for k, v in _named(args, lambda f: str(load_features(Path(f)).meta.get("model")
                                                               or Path(f).stem)).items()}
    features = load_feature_files(paths)
    chain = [name for name in paths if name != "paragon"] if args.chain else None
    check_comparable(features, chain, paths)
    labels = features["old"].labels
    per_class = int(torch.unique(labels, return_counts=True)[1].min())
    if args.gallery_per_class < 1 or args.gallery_per_class >= per_class:
        raise ConfigError(
            f"--gallery-per-class {args.gallery_per_class}: must be >= 1 and leave probes "
            f"(smallest identity has {per_class} images)"
        )
    dataset = str(features["old"].meta.get("dataset", Path(args.old).name))
    parts = set(SPLIT_TESTS) if "all" in args.tests else set(args.tests)
    fars = tuple(args.fars or (1e-5, 1e-4, 1e-3, 1e-2))
    protocol = EvalProtocol(dataset, labels, args.gallery_per_class, fars, tuple(args.topk or (1, 5)),
                            tuple(args.fpirs or (1e-2, 1e-1)),
                            retrieval="retrieval" in parts, identification="identification" in parts,
                            verification="verification" in parts)
    files = {k: str(v) for k, v in paths.items()}
    extra = {"dataset": f"{dataset}: {len(labels)} images", "feature_files": files}
    out = Path(args.out)
    report = evaluate_suite(features, protocol, out, models_info_from_features(features), extra,
                            backfill=not args.no_backfill, chain=chain)
    print(f"report: {out}/report.md ({len(report['results'])} results)")
    return 0
