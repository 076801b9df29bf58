"""Market-1501 / DukeMTMC-reID evaluation: ``query/`` searches ``bounding_box_test/``.

The rules are those of the datasets' standard evaluation (Zheng et al.'s Market-1501 code, and the
re-id libraries that follow it):

- relevant ("good"): gallery images of the query's person taken by another camera;
- junk, removed from the query's ranking before anything is counted: gallery images of the query's
  person from the query's own camera, and every gallery image with person id -1 (boxes too poor to
  label);
- distractors: person id 0000 (boxes with no person of interest) stay in the ranking as non-matches,
  like every other person's images;
- a query with no relevant image is left out of mAP and CMC (none in the released sets).

mAP: mean over queries of AP = the mean, over the relevant images, of the precision at each one's
rank (junk removed) — the definition of deep-person-reid / fast-reid and of bctkit's retrieval
metrics. ``ap="trapezoid"`` gives instead the Market-1501 MATLAB code's variant (also in
Person_reID_baseline_pytorch), which averages the precision just before and at each hit; it is never
lower. CMC rank-k: fraction of queries whose best relevant image ranks within k. Ties: the lower
gallery row first. Counted blockwise (:mod:`bctkit.evaluation.blockwise`), exact, bounded memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from bctkit.data.sources.market import ConcatSource, ReIDFolderSource, reid_folders
from bctkit.errors import DataError
from bctkit.evaluation.protocols.base import PairResult, Protocol
from bctkit.evaluation.protocols.retrieval import RankingOptions, ranking_records

__all__ = ["AP_RULES", "ReIDProtocol"]

AP_RULES = {"mean": "ap", "trapezoid": "ap_trapezoid"}
JUNK_PID = -1


@dataclass(frozen=True, eq=False)
class ReIDProtocol(Protocol):
    """Re-id test (the module docstring gives the rules). ``pids`` / ``cams``: person id and camera
    of every source row; rows ``< n_query`` are the queries, the rest the gallery."""

    dataset: str
    pids: np.ndarray
    cams: np.ndarray
    n_query: int
    source: ConcatSource | None = None
    options: RankingOptions = field(default_factory=RankingOptions)
    ap: str = "mean"

    name: ClassVar[str] = "market"

    def __post_init__(self) -> None:
        if self.ap not in AP_RULES:
            raise DataError(f"ap {self.ap!r}: expected one of {', '.join(AP_RULES)}")
        if len(self.pids) != len(self.cams) or not 0 < self.n_query < len(self.pids):
            raise DataError(f"{self.dataset}: need pids and cams for every row and at least one query and "
                            f"one gallery image ({self.n_query} queries, {len(self.pids)} rows)")

    @classmethod
    def from_sources(cls, query: ReIDFolderSource, gallery: ReIDFolderSource, dataset: str | None = None,
                     options: RankingOptions | None = None, ap: str = "mean") -> ReIDProtocol:
        source = ConcatSource([query, gallery], name=f"{query.name} -> {gallery.name}")
        return cls(dataset or str(query.root.name), np.concatenate([query.pids, gallery.pids]),
                   np.concatenate([query.cams, gallery.cams]), len(query), source,
                   options or RankingOptions(), ap)

    @classmethod
    def from_root(cls, root: str | os.PathLike[str], query: str = "query", dataset: str | None = None,
                  options: RankingOptions | None = None, ap: str = "mean") -> ReIDProtocol:
        """From a Market-1501 / DukeMTMC-reID folder (``query`` = ``query`` or ``gt_bbox``)."""
        q, g = reid_folders(root, query)
        return cls.from_sources(q, g, dataset, options, ap)

    def _counts(self) -> dict[str, int]:
        qp, gp = self.pids[: self.n_query], self.pids[self.n_query :]
        return {"queries": self.n_query, "gallery_images": len(gp),
                "gallery_junk": int((gp == JUNK_PID).sum()), "gallery_distractors": int((gp == 0).sum()),
                "query_identities": len(np.unique(qp)), "gallery_identities": len(np.unique(gp[gp > 0]))}

    def describe(self) -> dict[str, Any]:
        return {"protocol": self.name, "dataset": self.dataset, **self._counts(), "ap": self.ap,
                **self.options.describe()}

    @property
    def headline(self) -> tuple[str, ...]:
        """mAP (always exact, what retrieval and re-id results are quoted by), then rank-1."""
        return ("map", "top1")

    def evaluate_pair(self, query: torch.Tensor, gallery: torch.Tensor, dims: str) -> PairResult:
        n = len(self.pids)
        if query.shape[0] != n or gallery.shape[0] != n:
            raise DataError(f"{self.dataset}: features have {query.shape[0]} / {gallery.shape[0]} rows; "
                            f"expected {n} (queries then gallery)")
        c = self._counts()
        nq = self.n_query
        desc = (f"re-id ({self.name} rules), {self.dataset}: {c['queries']} queries search "
                f"{c['gallery_images']} gallery images; junk removed: id -1 ({c['gallery_junk']}) and "
                f"same id + same camera; id 0000 distractors ({c['gallery_distractors']}) kept; "
                f"AP = {self.ap} over hits; {dims}")
        return ranking_records(
            query[:nq], gallery[nq:], self.pids[:nq], self.pids[nq:], self.options, desc,
            qcams=self.cams[:nq], gcams=self.cams[nq:], junk=self.pids[nq:] == JUNK_PID,
            ap=AP_RULES[self.ap], map_at_r=False)
