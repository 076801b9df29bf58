"""Evaluate a set of models' features and write the report: shared by ``bctkit run`` and
``bctkit evaluate`` (features of models trained elsewhere)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bctkit.errors import DataError
from bctkit.evaluation.analysis import (
    backfill_curves,
    chain_summary,
    compatibility_summary,
    matrices,
    transform_summary,
    write_plots,
)
from bctkit.evaluation.certificate import certificates_for_report, write_certificates
from bctkit.evaluation.diagnosis import TrainProvider, diagnose
from bctkit.evaluation.flips import flip_table
from bctkit.evaluation.protocols import EvalProtocol, Protocol, evaluate_models
from bctkit.evaluation.report import write_report
from bctkit.features import FeatureSet, load_features

MATRIX_METRICS = ("top1", "tar@far=1e-3")


def evaluate_suite(
    features: dict[str, FeatureSet], protocol: Protocol, out_dir: Path,
    models_info: dict[str, dict[str, Any]], extra: dict[str, Any] | None = None, backfill: bool = True,
    chain: list[str] | None = None, log: Callable[[str], None] | None = None, progress: bool = False,
    train_features: TrainProvider | None = None, transforms: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """All metrics for every comparable (query, gallery) pair, the compatibility analysis, plots,
    compatibility certificates (``out_dir``/certificates, listed in report["certificates"] relative to
    ``out_dir``), report.json and report.md in ``out_dir``. ``features`` must contain "old". ``chain``: model
    names of a sequence of upgrades, oldest first, for the multi-model metrics. ``log`` receives a
    line per stage and ``progress`` shows a bar over the model pairs (metrics can take a while).
    ``report["diagnosis"]``: each claim that failed or nearly failed, diagnosed (evaluation.diagnosis);
    ``train_features`` gives a pair's features of training images, called only for those claims.
    ``transforms``: the models of ``features`` that are a transformed old gallery h(old) (name ->
    {"target": the new model h maps into, "log_var": FastFill's log sigma^2 per image or None}):
    paired only with their target, summarised in report["transforms"], certified as the target's
    gallery against the old self test, and backfilled in random, benefit and uncertainty orders."""
    if "old" not in features:
        raise DataError("evaluation needs the old model's features (name 'old')")
    say = log or (lambda _msg: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"[metrics] {len(features)} models, every comparable (query, gallery) pair")
    transforms = transforms or {}
    records, pairs = evaluate_models(features, protocol, progress=progress,
                                     spaces={n: how["target"] for n, how in transforms.items()})
    names = list(features)
    present = {r["metric"] for r in records}
    headline = [m for m in dict.fromkeys((*protocol.headline, *MATRIX_METRICS)) if m in present]
    mats = matrices(records, names, headline)
    do_backfill = backfill and protocol.backfill and isinstance(protocol, EvalProtocol)
    if do_backfill:
        say("[metrics] partial-backfill curves")
    curves = backfill_curves(features, protocol, transforms=transforms) if do_backfill else {}
    report = {
        **(extra or {}),
        "models": models_info,
        "results": records,
        "compatibility": compatibility_summary(records, [n for n in names if n not in transforms]),
        "matrices": mats,
        "backfill": curves,
        "flips": flip_table(pairs),
        "plots": write_plots(out_dir, pairs, names, mats, curves),
        "headline": list(protocol.headline),
    }
    say(f"[plots] {', '.join(report['plots']) or 'none'}")
    if transforms:
        report["transforms"] = transform_summary(records, transforms)
    if chain:
        report["chain"] = chain_summary(records, chain, headline)
    say("[certificates] one per (new model, model it claims compatibility with) cross test")
    certs = certificates_for_report(report, features, protocol)
    written = write_certificates(out_dir / "certificates", certs)
    report["certificates"] = [str(p.relative_to(out_dir)) for p in written]
    report["certificate_results"] = [
        {"file": str(p.relative_to(out_dir)), "query": c["query"]["name"], "gallery": c["gallery"]["name"],
         "metric": c["criterion"]["metric"], "cross": c["criterion"]["cross"],
         "old_self": c["criterion"]["old_self"], "passed": c["passed"], "sha256": c["sha256"],
         **({"negative_flip_rate": c["flips"]["negative_flip_rate"]} if c.get("flips") else {})}
        for p, c in zip(written, certs, strict=True)]
    report["diagnosis"] = diagnose(report, features, protocol, train_features)
    if report["diagnosis"]:
        say(f"[diagnosis] {len(report['diagnosis'])} claim(s) failed or nearly failed: see report.md")
    write_report(out_dir, report)
    return report


def load_feature_files(paths: dict[str, Path]) -> dict[str, FeatureSet]:
    """Load named feature files and check they describe the same images in the same order."""
    loaded = {name: load_features(Path(p)) for name, p in paths.items()}
    ref_name, ref = next(iter(loaded.items()))
    for name, fs in loaded.items():
        if not torch.equal(fs.labels, ref.labels):
            raise DataError(
                f"{paths[name]}: labels differ from {paths[ref_name]}; feature files must hold the same "
                "images in the same order"
            )
        a, b = fs.meta.get("images_fingerprint"), ref.meta.get("images_fingerprint")
        if a and b and a != b:
            raise DataError(
                f"{paths[name]}: made from other images than {paths[ref_name]} (fingerprints differ)"
            )
    return loaded


def models_info_from_features(features: dict[str, FeatureSet]) -> dict[str, dict[str, Any]]:
    """What the report's model table can say about models known only by their features."""
    return {
        name: {
            "method": fs.meta.get("method"), "params": fs.meta.get("params"),
            "fingerprint": fs.meta.get("model_fingerprint", "unknown"),
            "train_images": fs.meta.get("train_images"), "num_classes": fs.meta.get("num_classes"),
            "embedding_dim": fs.dim, "compat_dims": fs.compat_dims, "layout": fs.meta.get("layout"),
        }
        for name, fs in features.items()
    }
