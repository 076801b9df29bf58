"""Compatibility certificates: a JSON file claiming that queries embedded by one model may search a
gallery embedded by another, with the cross test that supports the claim.

A certificate names both models (name, fingerprint, embedding size), the coordinates the cross test
compared (``query_dims`` / ``gallery_dims``, derived by :func:`bctkit.evaluation.protocols.comparable`
exactly as the evaluation did), the protocol, every metric's cross / old-self / self values, and the
strict criterion M(new, old) > M(old, old) on the first identification metric. It is written for a
failed criterion too (``passed: false``): it records the result, and a gallery refuses it.

``sha256`` is the hash of the canonical JSON of every other field. It detects edits and corruption
(a value changed by hand, a truncated copy); it is not a signature: anyone can recompute it after an
edit, so it does not prove who issued the certificate or that the numbers were measured. Trust a
certificate as much as the place it came from.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bctkit import __version__
from bctkit.errors import BctkitError, FileFormatError
from bctkit.evaluation.analysis import compatibility_summary
from bctkit.evaluation.flips import flips_of
from bctkit.evaluation.protocols import Protocol, comparable
from bctkit.features import FeatureSet
from bctkit.storage import json_problem, json_safe, read_json, write_json

FORMAT = "bctkit-compatibility-certificate"
VERSION = 1
FIELDS = ("format", "version", "query", "gallery", "query_dims", "gallery_dims", "protocol", "metrics",
          "criterion", "passed", "update_gain", "issued_by", "sha256")
IDENTIFICATION = re.compile(r"top\d+|tpir@")


class CertificateError(BctkitError):
    """A certificate is unreadable, malformed, of an unknown format or version, or edited."""


def canonical_hash(cert: dict[str, Any]) -> str:
    """Hex sha256 of the canonical JSON of every field but ``sha256``."""
    body = {k: v for k, v in cert.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def compared_dims(query: FeatureSet, gallery: FeatureSet) -> tuple[list[int], list[int]] | None:
    """([start, end] of the query, [start, end] of the gallery) a cross test compares, or None when
    the two are not comparable; the evaluation's own rule (leading blocks)."""
    view = comparable(query, gallery)
    if view is None:
        return None
    q, g, _ = view
    return [0, int(q.shape[1])], [0, int(g.shape[1])]


def criterion_metric(metrics: list[str], preferred: Sequence[str] = ()) -> str:
    """The metric the criterion is judged on: the first of ``preferred`` (the protocol's headline
    metrics) that was measured, else top1 if measured, else the first identification metric, else
    the first metric."""
    for m in preferred:
        if m in metrics:
            return m
    if "top1" in metrics:
        return "top1"
    return next((m for m in metrics if IDENTIFICATION.match(m)), metrics[0])


def _model(name: str, fs: FeatureSet, fingerprint: str | None = None) -> dict[str, Any]:
    fp = fs.meta.get("model_fingerprint") or fingerprint or "unknown"
    return {"name": name, "fingerprint": str(fp), "embedding_dim": fs.dim}


def make_certificate(
    query_name: str, query: FeatureSet, gallery_name: str, gallery: FeatureSet,
    metrics: dict[str, dict[str, Any]], protocol: dict[str, Any],
    fingerprints: dict[str, str] | None = None, preferred: Sequence[str] = (),
    flips: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The certificate that ``query_name``'s queries may search ``gallery_name``'s gallery.

    ``metrics``: per metric the compatibility summary entry (cross, self, old_self, criterion,
    update_gain) of this pair; ``protocol``: what was measured. ``fingerprints``: model fingerprints by
    name, used where a feature file does not carry one. ``preferred``: the metrics to judge the
    criterion on, first measured first (see :func:`criterion_metric`). ``flips``: the pair's negative
    and positive flips against old / old (:mod:`bctkit.evaluation.flips`), stated when given."""
    dims = compared_dims(query, gallery)
    if dims is None:
        raise CertificateError(f"{query_name} / {gallery_name}: the features have no coordinates in common; "
                               "there is no cross test to certify")
    if not metrics:
        raise CertificateError(f"{query_name} / {gallery_name}: no metrics to certify")
    fps = fingerprints or {}
    entries = {m: {k: v[k] for k in ("cross", "old_self", "self", "criterion", "update_gain")}
               for m, v in metrics.items()}
    measured = [m for m, e in entries.items() if all(_finite(e[k]) for k in ("cross", "old_self"))]
    metric = criterion_metric(list(entries), [m for m in preferred if m in measured])
    chosen = entries[metric]
    passed = bool(chosen["criterion"])
    body = json_safe({
        "format": FORMAT, "version": VERSION,
        "query": _model(query_name, query, fps.get(query_name)),
        "gallery": _model(gallery_name, gallery, fps.get(gallery_name)),
        "query_dims": dims[0], "gallery_dims": dims[1],
        "protocol": protocol,
        "metrics": entries,
        "criterion": {"metric": metric, "cross": chosen["cross"], "old_self": chosen["old_self"],
                      "passed": passed},
        "passed": passed,
        "update_gain": chosen["update_gain"],
        **({"flips": {k: flips[k] for k in ("negative_flip_rate", "positive_flip_rate", "negative_flips",
                                             "positive_flips", "n")}} if flips else {}),
        "issued_by": f"bctkit {__version__}",
    })
    return {**body, "sha256": canonical_hash(body)}


def write_certificate(path: str | os.PathLike[str], cert: dict[str, Any]) -> None:
    """Write ``cert`` as JSON, atomically."""
    write_json(path, cert)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_model(side: str, v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"'{side}' is not an object"
    for key in ("name", "fingerprint", "embedding_dim"):
        if key not in v:
            return f"missing field '{side}.{key}'"
    if not isinstance(v["name"], str) or not v["name"] or not isinstance(v["fingerprint"], str) \
            or not v["fingerprint"]:
        return f"'{side}.name' and '{side}.fingerprint' must be non-empty strings"
    if not _int(v["embedding_dim"]) or v["embedding_dim"] < 1:
        return f"'{side}.embedding_dim' must be a positive integer"
    return None


def _check_dims(side: str, dims: Any, dim: int) -> str | None:
    if not (isinstance(dims, list) and len(dims) == 2 and all(_int(d) for d in dims)):
        return f"'{side}_dims' must be [start, end] (two integers)"
    if not 0 <= dims[0] < dims[1] <= dim:
        return f"'{side}_dims' {dims} lies outside the {dim}-d embedding"
    return None


def _problem(cert: dict[str, Any]) -> str | None:
    """What is wrong with a certificate object, or None."""
    fmt = cert.get("format")
    if fmt != FORMAT:
        return f"unknown format {fmt!r} (expected {FORMAT!r})"
    version = cert.get("version")
    if not _int(version) or version < 1:
        return f"invalid version {version!r}"
    if version > VERSION:
        return f"version {version} is newer than this bctkit reads ({VERSION}); upgrade bctkit"
    missing = [k for k in FIELDS if k not in cert]
    if missing:
        return f"missing field '{missing[0]}'"
    if not isinstance(cert["sha256"], str) or cert["sha256"] != canonical_hash(cert):
        return "hash does not match its contents (edited after it was issued?)"
    for side in ("query", "gallery"):
        bad = _check_model(side, cert[side])
        bad = bad or _check_dims(side, cert[f"{side}_dims"], cert[side]["embedding_dim"])
        if bad:
            return bad
    q, g = cert["query_dims"], cert["gallery_dims"]
    if q[1] - q[0] != g[1] - g[0]:
        return f"query_dims {q} and gallery_dims {g} differ in length"
    return _check_results(cert)


def _check_results(cert: dict[str, Any]) -> str | None:
    metrics, crit = cert["metrics"], cert["criterion"]
    if not isinstance(metrics, dict) or not metrics or not all(isinstance(v, dict) for v in metrics.values()):
        return "'metrics' must be a non-empty object of per-metric objects"
    for name, entry in metrics.items():
        for key in ("cross", "old_self", "self", "update_gain"):
            if entry.get(key) is not None and not _number(entry.get(key)):
                return f"'metrics.{name}.{key}' must be a number or null"
        if not isinstance(entry.get("criterion"), bool):
            return f"'metrics.{name}.criterion' must be true or false"
    if not isinstance(cert["protocol"], dict) or not isinstance(cert["issued_by"], str):
        return "'protocol' must be an object and 'issued_by' a string"
    if not isinstance(crit, dict) or crit.get("metric") not in metrics:
        return "'criterion.metric' must name one of the metrics"
    entry = metrics[crit["metric"]]
    if crit.get("cross") != entry["cross"] or crit.get("old_self") != entry["old_self"]:
        return f"'criterion' values differ from 'metrics.{crit['metric']}'"
    holds = _number(crit["cross"]) and _number(crit["old_self"]) and crit["cross"] > crit["old_self"]
    if crit.get("passed") is not holds or cert["passed"] is not holds or entry["criterion"] is not holds:
        return f"'passed' does not follow from cross {crit['cross']} > old_self {crit['old_self']}"
    if cert["update_gain"] != entry["update_gain"]:
        return f"'update_gain' differs from 'metrics.{crit['metric']}.update_gain'"
    flips = cert.get("flips")  # certificates before negative flips were measured have none
    rates = ("negative_flip_rate", "positive_flip_rate")
    if flips is not None and not (isinstance(flips, dict) and _int(flips.get("n"))
                                  and all(_number(flips.get(k)) and 0 <= flips[k] <= 1 for k in rates)):
        return "'flips' must hold negative_flip_rate and positive_flip_rate in [0, 1] and n (an integer)"
    return None


def verify_certificate(cert_or_path: dict[str, Any] | str | os.PathLike[str],
                       name: str | None = None) -> dict[str, Any]:
    """The certificate (read from a file, or given), checked: strict JSON (no NaN or Infinity, not
    nested absurdly deep), format, version, fields and their types, dims within the embeddings and of
    equal length, criterion consistent, and the hash. Raises
    a one-line :class:`CertificateError` naming the file (or ``name``) and the problem."""
    if isinstance(cert_or_path, dict):
        where, cert = name or "certificate", cert_or_path
    else:
        where = name or str(cert_or_path)
        try:
            cert = read_json(cert_or_path)
        except FileFormatError as exc:
            raise CertificateError(str(exc)) from None
    problem = "not a JSON object" if not isinstance(cert, dict) else json_problem(cert) or _problem(cert)
    if problem:
        raise CertificateError(f"{where}: {problem}")
    return cert


def _metric_values(report: dict[str, Any], query: str, gallery: str) -> dict[str, dict[str, Any]]:
    """The compatibility summary of ``query`` against ``gallery`` (as its old model). A transformed
    gallery h(old) is judged against the old model's self test: M(target, h) > M(old, old)."""
    if gallery in (report.get("transforms") or {}):  # old / old plays the gallery's self test
        wanted = {("old", "old"): (gallery, gallery), (query, gallery): (query, gallery),
                  (query, query): (query, query), ("paragon", "paragon"): ("paragon", "paragon")}
        records = [{**r, "value": math.nan if r["value"] is None else r["value"],
                    "query_model": wanted[pair][0], "gallery_model": wanted[pair][1]}
                   for r in report["results"] if (pair := (r["query_model"], r["gallery_model"])) in wanted]
    else:
        keep = {query, gallery, "paragon"}
        records = [{**r, "value": math.nan if r["value"] is None else r["value"]} for r in report["results"]
                   if r["query_model"] in keep and r["gallery_model"] in keep]
    if not any((r["query_model"], r["gallery_model"]) == (query, gallery) for r in records):
        return {}
    return compatibility_summary(records, [gallery, query], old=gallery)[query]


def _protocol(report: dict[str, Any], labels: torch.Tensor, records: list[dict[str, Any]],
              protocol: Protocol | None) -> dict[str, Any]:
    names = list(dict.fromkeys(r["metric"] for r in records))
    if protocol is not None:
        out = protocol.describe()
        if report.get("dataset"):
            out["dataset"] = report["dataset"]
    else:
        out = {"dataset": report.get("dataset"), "images": len(labels),
               "identities": len(torch.unique(labels)),
               "fars": [float(m.split("=")[1]) for m in names if m.startswith("tar@far=")],
               "fpirs": [float(m.split("=")[1]) for m in names if m.startswith("tpir@fpir=")],
               "topk": [int(m[3:]) for m in names if re.fullmatch(r"top\d+", m)]}
    out["tests"] = list(dict.fromkeys(r["protocol"] for r in records))
    return out


def certificate_pairs(report: dict[str, Any], old: str = "old") -> list[tuple[str, str]]:
    """(new model, model it claims compatibility with): every new model (not the paragon) against the
    old one, for a chain each version against its predecessor, and each transformation's target
    against the transformed gallery h(old); only pairs with a cross test."""
    tested = {(r["query_model"], r["gallery_model"]) for r in report["results"]}
    pairs = [(name, old) for name in report.get("compatibility", {}) if name not in (old, "paragon")]
    pairs += [(t["target"], name) for name, t in (report.get("transforms") or {}).items()]
    chain = (report.get("chain") or {}).get("models") or []
    pairs += [(chain[i], chain[i - 1]) for i in range(1, len(chain))]
    return [p for p in dict.fromkeys(pairs) if p in tested]


def certificates_for_report(report: dict[str, Any], features: dict[str, FeatureSet],
                            protocol: Protocol | None = None) -> list[dict[str, Any]]:
    """A certificate for every pair of :func:`certificate_pairs`, with the report's values.
    ``protocol``: the evaluation protocol, for the exact gallery / probe sizes (else from the report)."""
    fps = {n: info.get("fingerprint") for n, info in report.get("models", {}).items()
           if isinstance(info.get("fingerprint"), str) and info.get("fingerprint") != "unknown"}
    certs = []
    for query, gallery in certificate_pairs(report):
        missing = [n for n in (query, gallery) if n not in features]
        if missing:
            raise CertificateError(f"no features of model {missing[0]!r} for its certificate")
        records = [r for r in report["results"] if (r["query_model"], r["gallery_model"]) == (query, gallery)]
        certs.append(make_certificate(
            query, features[query], gallery, features[gallery], _metric_values(report, query, gallery),
            _protocol(report, features[gallery].labels, records, protocol), fps,
            protocol.headline if protocol is not None else (), flips_of(report, query, gallery)))
    return certs


def certificate_filename(cert: dict[str, Any]) -> str:
    """``<query>__<gallery>.json``, model names reduced to safe file-name characters."""
    safe = [re.sub(r"[^A-Za-z0-9._-]", "_", cert[side]["name"]) for side in ("query", "gallery")]
    return f"{safe[0]}__{safe[1]}.json"


def write_certificates(folder: Path, certs: list[dict[str, Any]]) -> list[Path]:
    """Write each certificate to ``folder``/<query>__<gallery>.json; returns the paths."""
    paths = []
    for cert in certs:
        path = folder / certificate_filename(cert)
        write_certificate(path, cert)
        paths.append(path)
    return paths


def describe(cert: dict[str, Any]) -> str:
    """One line: the pair, the criterion metric and its values, the negative flips where stated,
    passed or failed."""
    c = cert["criterion"]

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.2f} %"

    q, g = cert["query"], cert["gallery"]
    verdict = "passed" if cert["passed"] else "failed"
    f = cert.get("flips")
    flips = f", negative flips {pct(f['negative_flip_rate'])} of {f['n']} queries" if f else ""
    return (f"{q['name']} ({q['fingerprint']}) queries on {g['name']} ({g['fingerprint']}) gallery, "
            f"dims {cert['query_dims']} vs {cert['gallery_dims']}: {c['metric']} cross {pct(c['cross'])} "
            f"vs old self {pct(c['old_self'])}{flips}, {verdict}")
