"""How a run evaluates: the protocol over its own held-out set (``evaluation.protocol``) and the
test sets read from disk that every model of the run is evaluated on afterwards
(``evaluation.test_sets``), as ``bctkit evaluate --protocol NAME --data ...`` would with the run's
model files.

The papers' experiments need both: BT^2 and BCT evaluate leave-one-out on the test set of the
classes they trained on (``protocol: loo`` with ``data.eval`` the CIFAR-100 test set or the
ImageNet validation set), UniBCT's landmark models are trained on GLDv2 and evaluated on Revisited
Oxford and Paris and GLDv2's retrieval test (``test_sets``). Each test set writes its own report,
plots and certificates to ``REPORTS/test_sets/<name>``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from bctkit.data.sources.base import DataSource
from bctkit.engine.distributed import is_main
from bctkit.errors import ConfigError
from bctkit.evaluation.protocols import EvalProtocol, Protocol
from bctkit.evaluation.testset import (
    PROTOCOLS,
    ExtractOptions,
    TestSetOptions,
    build_protocol,
    evaluate_testset,
)
from bctkit.models.transformation import LoadedTransformation
from bctkit.storage import write_json, write_text

if TYPE_CHECKING:
    from bctkit.run.config import RunConfig

__all__ = ["RUN_PROTOCOLS", "TestSetConfig", "evaluate_test_sets", "note_test_sets", "run_protocol"]

RUN_PROTOCOLS = ("split", "loo")
"""Protocols over the run's own held-out set: ``split`` (the first ``gallery_per_class`` images of each
identity are the gallery, the rest probes; 1:N, 1:1 and retrieval) and ``loo`` (leave-one-out
retrieval: every image queries all the others, top-k and mAP over the whole ranking)."""


class TestSetConfig(BaseModel):
    """One test set every model of the run is evaluated on: ``protocol`` and its ``data`` paths as
    ``bctkit evaluate --protocol PROTOCOL --data PATH...`` takes them; ``name``: its report folder
    (default: the protocol); ``topk``: CMC ranks (default: the protocol's own)."""

    model_config = ConfigDict(extra="forbid")

    protocol: str
    data: list[str] = Field(min_length=1)
    name: str | None = None
    topk: list[int] | None = Field(None, min_length=1)

    @field_validator("protocol")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in PROTOCOLS:
            raise ValueError(f"unknown test-set protocol {name!r}; expected one of {sorted(PROTOCOLS)}")
        return name

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str | None) -> str | None:
        if name is not None and (not name or "/" in name or name in (".", "..")):
            raise ValueError(f"test set name {name!r} must be a plain folder name")
        return name

    @property
    def display_name(self) -> str:
        return self.name or self.protocol


def check_test_sets(cfg: RunConfig) -> None:
    """Load-time checks: unique report folders, and an old model that can be run on other images."""
    sets = cfg.evaluation.test_sets
    names = [t.display_name for t in sets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"evaluation.test_sets: {twice[0]!r} names two test sets; give each a unique 'name'")
    if sets and cfg.old.source == "features":
        raise ValueError("evaluation.test_sets needs the old model itself: old.source=features gives "
                         "only its features of the training and evaluation images, not of a test set's")


def run_protocol(cfg: RunConfig, eval_set: DataSource, labels: torch.Tensor) -> Protocol:
    """The protocol over the run's held-out set (``evaluation.protocol``)."""
    ev = cfg.evaluation
    if ev.protocol == "loo":
        from bctkit.evaluation.protocols.loo import LeaveOneOutProtocol

        return LeaveOneOutProtocol(eval_set.name, np.asarray(labels), source=eval_set, ks=tuple(ev.topk))
    return EvalProtocol(eval_set.name, labels, ev.gallery_per_class, tuple(ev.fars), tuple(ev.topk),
                        tuple(ev.fpirs), ev.retrieval)


def describe_held_out(cfg: RunConfig, eval_set: DataSource) -> str:
    """The report's dataset line for the run's held-out set."""
    what = f"{eval_set.name}: {len(eval_set)} images of {eval_set.num_classes} "
    if cfg.evaluation.protocol == "loo":
        return what + ("classes, leave-one-out (each image queries all the others; the classes may be "
                       "the training classes, as in BT^2's and BCT's closed-set evaluation)")
    return what + "identities never used in training" + (
        "" if cfg.evaluation.split == "test" else
        " (validation split: for choosing settings, not the test identities)")


def evaluate_test_sets(cfg: RunConfig, models_dir: Path, names: list[str], reports: Path,
                       chain: list[str] | None, log: Callable[[str], None], progress: bool,
                       transforms: dict[str, LoadedTransformation] | None = None) -> dict[str, Any]:
    """Every model in ``names`` (files ``models_dir/<name>/model.safetensors``) on each of
    ``evaluation.test_sets``, and each transformed gallery of ``transforms`` (by name; those with
    side information are left out, named in the log: a test set's side features are not extracted);
    returns {test set: {"report": path, "certificates": [...]}} (rank 0)."""
    ev, out = cfg.evaluation, {}
    files = {name: models_dir / name / "model.safetensors" for name in names}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise ConfigError(f"evaluation.test_sets: no model file {missing[0]}")
    models = {n: str(f) for n, f in files.items()}
    ex = ExtractOptions(flip=ev.flip, batch_size=ev.batch_size, workers=cfg.data.workers(),
                        device=cfg.new.train.device)
    plain = {n: h for n, h in (transforms or {}).items() if not h.config.side_dim}
    for n in sorted(set(transforms or {}) - set(plain)):
        log(f"[test set] {n}: takes side information, which test sets do not extract; not evaluated there")
    for ts in ev.test_sets:
        opts = TestSetOptions(topk=None if ts.topk is None else tuple(ts.topk))  # else the protocol's own
        protocol = build_protocol(ts.protocol, ts.data, opts)
        folder = reports / "test_sets" / ts.display_name
        log(f"[test set] {ts.display_name}: {ts.protocol} on {' '.join(ts.data)}")
        report = evaluate_testset(protocol, models, folder, ex, chain=chain, log=log, progress=progress,
                                  data=ts.data, transforms=plain)
        if is_main() and report is not None:
            out[ts.display_name] = {"report": str(folder / "report.md"),
                                    "certificates": report.get("certificate_results", [])}
            log(f"[test set] {ts.display_name}: {folder / 'report.md'}")
    return out


def note_test_sets(reports: Path, done: dict[str, Any]) -> None:
    """Add the test sets' reports and claims to the run's report.json and report.md."""
    path = reports / "report.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["test_sets"] = done
    write_json(path, data)
    lines = ["", "## Test sets", "", "| test set | report | claims passed |", "|---|---|---|"]
    for name, item in done.items():
        certs = item["certificates"]
        passed = sum(bool(c["passed"]) for c in certs)
        rel = Path(item["report"]).relative_to(reports)
        lines.append(f"| {name} | [{rel}]({rel}) | {passed} of {len(certs)} |")
    md = reports / "report.md"
    write_text(md, md.read_text(encoding="utf-8").rstrip("\n") + "\n" + "\n".join(lines) + "\n")
