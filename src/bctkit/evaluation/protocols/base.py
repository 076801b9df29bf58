"""The protocol interface: how one test set turns two models' features into metric records.

A protocol owns a fixed list of images (row i of every model's features is image i) and the rules of
its tests: which rows are probes, gallery items, templates or pairs. :meth:`Protocol.evaluate_pair`
gets the features of the query model and of the gallery model over those rows, already cut to the
coordinates the two models share (:func:`comparable`), and returns records and curves. Cross tests
follow one convention everywhere: the query / probe / first template of a pair is embedded by the
query model, the gallery / second template by the gallery model.

:func:`evaluate_models` runs one protocol over every comparable ordered pair of models: the
self/cross matrix that reports, plots and certificates are built from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from bctkit.errors import ConfigError
from bctkit.features import FeatureSet


def rate_name(kind: str, rate: float) -> str:
    """Metric name such as ``tar@far=1e-4`` or ``tpir@fpir=1e-2``."""
    return f"{kind}={rate:.0e}".replace("e-0", "e-")


@dataclass
class PairResult:
    """Records of one (query, gallery) pair plus the curves behind them, for plots. ``top1_hits``:
    where the protocol measures top-1, whether each of its queries was right at rank 1 (bool, in
    the protocol's query order, which no model changes), for the negative flips
    (:mod:`bctkit.evaluation.flips`)."""

    records: list[dict[str, Any]]
    roc: tuple[np.ndarray, np.ndarray] | None = None
    cmc: dict[int, float] = field(default_factory=dict)
    top1_hits: torch.Tensor | None = None


class Protocol(ABC):
    """One test set and its rules. Subclasses set ``name`` (the ``--protocol`` value) and
    ``dataset`` (what the report calls the test set)."""

    name: ClassVar[str]
    dataset: str

    @abstractmethod
    def evaluate_pair(self, query: torch.Tensor, gallery: torch.Tensor, dims: str) -> PairResult:
        """Records (metric, value, n, protocol; no model names) and curves for the query model's
        features ``query`` and the gallery model's ``gallery`` [N, d] over this protocol's images;
        ``dims`` says which coordinates were compared, for the records' descriptions."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-ready facts of the test (sizes, rates): what a certificate states was measured."""

    @property
    def headline(self) -> tuple[str, ...]:
        """The metrics that sum this test up, most telling first: the report's model x model
        matrices, and the certificate's criterion (the first one measured)."""
        return ("top1", "tar@far=1e-3")

    def caveats(self) -> list[str]:
        """One line per way this test set's numbers mislead (the CLI prints them, report.md shows
        them); none by default."""
        return []

    @property
    def backfill(self) -> bool:
        """Whether the partial-backfill curves (which need the run's own split) apply."""
        return False


def comparable(query: FeatureSet, gallery: FeatureSet) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """The coordinates compared when ``query``'s model queries ``gallery``'s, or None if none are.

    Equal sizes compare whole embeddings; otherwise the side that declares a compatible prefix
    (``compat_prefixes``) of the other's size is cut to it: BCT's rule for d_n > d_o, BT^2's bct
    block, and, through a chain of upgrades, the block compatible with an older ancestor.
    """
    q, g = query.feats, gallery.feats
    if q.shape[1] == g.shape[1]:
        return q, g, f"all {q.shape[1]} dims"
    if g.shape[1] in query.compat_prefixes:
        return q[:, : g.shape[1]], g, f"query dims [0:{g.shape[1]}]"
    if q.shape[1] in gallery.compat_prefixes:
        return q, g[:, : q.shape[1]], f"gallery dims [0:{q.shape[1]}]"
    return None


def check_comparable(features: dict[str, FeatureSet], chain: list[str] | None = None,
                     given: Mapping[str, object] | None = None) -> None:
    """Refuse a new model whose features share no coordinates with the model it claims compatibility
    with (the old one; along ``chain``, the previous version): its cross test would silently be
    missing from the report it exists for. ``given``: what each model was given as (a file or a
    model path), named in the error."""
    names = chain or [n for n in features if n != "paragon"]

    def label(n: str) -> str:
        return f"{n!r} ({given[n]})" if given is not None and n in given else repr(n)

    for i, name in enumerate(names[1:], start=1):
        ref = names[i - 1] if chain else "old"
        if comparable(features[name], features[ref]) is None:
            raise ConfigError(
                f"model {label(name)}: its {features[name].dim}-d features cannot be compared with the "
                f"{features[ref].dim}-d features of {label(ref)}: neither declares a compatible leading "
                "block of the other's size (metadata compat_prefixes); a compatible model has the same "
                "size or declares one")


def evaluate_models(
    features: dict[str, FeatureSet], protocol: Protocol, progress: bool = False,
    spaces: Mapping[str, str] | None = None,
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], PairResult]]:
    """Records for every ordered (query model, gallery model) pair whose embeddings are comparable,
    and the per-pair results (with curves) keyed by (query, gallery). ``spaces``: models that live
    in another model's space (a transformation h(old) -> its target) are paired only with that
    model and themselves, whatever their sizes."""
    records: list[dict[str, Any]] = []
    pairs: dict[tuple[str, str], PairResult] = {}
    spaces = spaces or {}

    def related(a: str, b: str) -> bool:
        return a not in spaces or b in (a, spaces[a])

    todo = [(qn, gn, view) for qn, qf in features.items() for gn, gf in features.items()
            if related(qn, gn) and related(gn, qn) and (view := comparable(qf, gf)) is not None]
    bar = tqdm(todo, desc="metrics", unit="pair", disable=not progress, leave=False)
    for qname, gname, (q, g, dims) in bar:
        res = protocol.evaluate_pair(q, g, dims)
        pairs[(qname, gname)] = res
        for rec in res.records:
            records.append({"query_model": qname, "gallery_model": gname, **rec})
    return records, pairs
