"""Revisited Oxford and Paris (Radenovic et al., CVPR 2018, "Revisiting Oxford and Paris"): 70 cropped
queries search the database (4,993 images for ROxford, 6,322 for RParis), optionally with distractors
(R1M) appended as negatives for every query. Data: :mod:`bctkit.data.sources.revisited`.

Each query lists its easy, hard and junk database images; every other image (distractors included)
is a negative. Three setups: **Easy** (positives: easy; junk: junk + hard), **Medium** (positives:
easy + hard; junk: junk), **Hard** (positives: hard; junk: junk + easy). Metrics as the authors'
evaluation code (revisitop's ``compute_map``) defines them, per query and setup:

- junk is removed from the ranking; r_j = the 0-based rank, among what remains, of the j-th positive
  (j = 0, 1, ... in rank order);
- AP = sum_j ((j / r_j if r_j > 0 else 1) + (j + 1) / (r_j + 1)) / 2 / n, n = the length of the
  setup's positive list (a trapezoid under the precision-recall curve);
- mP@k (k = 1, 5, 10): with p_j = r_j + 1 and k' = min(max_j p_j, k), the share of p_j <= k' over k';
- a query with no positive in a setup is left out of that setup's means.

Records: ``map_easy``, ``map_medium``, ``map_hard`` and ``mp@{k}_{setup}``; headline: Medium then Hard
mAP (what papers quote). Ties: the lower database row first (bctkit's rule everywhere; the authors'
``np.argsort`` leaves ties in no defined order). Lists that overlap or repeat an index are counted as
the authors' code counts them (an index both positive and junk is a positive for itself and junk for
the others; ``n`` counts repeats).

The ranking is never held: :func:`bctkit.evaluation.setwise.set_ranking` gives, for each listed item,
the negatives ranked ahead of it, walking the database in blocks; then a positive's r is those
negatives plus the listed items ahead of it that are not the setup's junk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from bctkit.data.sources.base import DataSource
from bctkit.data.sources.revisited import GND_FILES, RevisitedSource, distractor_source, read_gnd
from bctkit.errors import DataError
from bctkit.evaluation.protocols.base import PairResult, Protocol
from bctkit.evaluation.setwise import set_ranking

__all__ = ["SETUPS", "RevisitedProtocol", "setup_ap"]

SETUPS = ("easy", "medium", "hard")


def _setup_lists(easy: np.ndarray, hard: np.ndarray, junk: np.ndarray, setup: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(positive list, junk list) of one query in ``setup``."""
    if setup == "easy":
        return easy, np.concatenate([junk, hard])
    if setup == "medium":
        return np.concatenate([easy, hard]), junk
    return hard, np.concatenate([junk, easy])


def setup_ap(items: np.ndarray, negatives_ahead: np.ndarray, positives: np.ndarray, junk: np.ndarray,
             ks: tuple[int, ...]) -> tuple[float, list[float]] | None:
    """(AP, [mP@k]) of one query from its listed ``items`` in rank order and the negatives ranked
    ahead of each (the module docstring's definitions); None when ``positives`` is empty."""
    if positives.size == 0:
        return None
    is_pos, is_junk = np.isin(items, positives), np.isin(items, junk)
    kept = (~is_junk).astype(np.int64)
    r = (negatives_ahead + np.cumsum(kept) - kept)[is_pos].astype(np.float64)
    j = np.arange(r.size, dtype=np.float64)
    before = np.divide(j, r, out=np.ones_like(r), where=r > 0)
    ap = float(np.sum((before + (j + 1) / (r + 1)) / 2) / positives.size)
    p = r + 1
    prec = []
    for k in ks:
        kq = min(float(p.max()), float(k))
        prec.append(float((p <= kq).sum() / kq))
    return ap, prec


@dataclass(frozen=True, eq=False)
class RevisitedProtocol(Protocol):
    """Revisited Oxford / Paris (module docstring). Per query ``easy``, ``hard``, ``junk`` database
    indices; rows of the features: the queries, then ``n_database`` database images, then
    ``n_distractors`` distractors. ``block``: queries per block (memory)."""

    dataset: str
    easy: tuple[np.ndarray, ...]
    hard: tuple[np.ndarray, ...]
    junk: tuple[np.ndarray, ...]
    n_database: int
    n_distractors: int = 0
    source: DataSource | None = None
    ks: tuple[int, ...] = (1, 5, 10)
    block: int = 1024

    name: ClassVar[str] = "revisited"

    def __post_init__(self) -> None:
        nq = len(self.easy)
        if nq == 0 or len(self.hard) != nq or len(self.junk) != nq:
            raise DataError(f"{self.dataset}: need easy, hard and junk lists for each of at least one query")
        for field in ("easy", "hard", "junk"):
            for i, lst in enumerate(getattr(self, field)):
                a = np.asarray(lst)
                if a.size and (a.min() < 0 or a.max() >= self.n_database):
                    raise DataError(f"{self.dataset}: query {i}: {field} index outside the database "
                                    f"[0, {self.n_database})")
        if self.source is not None and len(self.source) != self.n_rows:
            raise DataError(f"{self.dataset}: source has {len(self.source)} images; expected {self.n_rows}")
        if self.block < 1 or not self.ks or min(self.ks) < 1:
            raise DataError(f"{self.dataset}: block and ks must be >= 1")

    @classmethod
    def from_root(cls, root: str | os.PathLike[str], dataset: str = "roxford5k",
                  distractors: str | os.PathLike[str] | None = None, block: int = 1024) -> RevisitedProtocol:
        """From ``root`` holding ``gnd_<dataset>.pkl`` and ``jpg/``; ``distractors``: a folder of
        images or a list file (R1M), appended to the database."""
        if dataset not in GND_FILES:
            raise DataError(f"revisited dataset {dataset!r}: expected one of {', '.join(GND_FILES)}")
        base = Path(root).expanduser()
        gnd_file = base / GND_FILES[dataset]
        if not gnd_file.is_file():
            raise DataError(f"{gnd_file}: not found; expected {base} to hold {GND_FILES[dataset]} and jpg/")
        gnd = read_gnd(gnd_file)
        extra = None if distractors is None else distractor_source(distractors)
        source = RevisitedSource(base, gnd, extra, name=dataset)
        return cls(dataset, tuple(gnd.easy), tuple(gnd.hard), tuple(gnd.junk), len(gnd.imlist),
                   len(extra or ()), source, block=block)

    @property
    def n_query(self) -> int:
        return len(self.easy)

    @property
    def n_rows(self) -> int:
        return self.n_query + self.n_database + self.n_distractors

    @cached_property
    def lists(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per query, its (easy, hard, junk) lists as int64 arrays."""
        return [tuple(np.asarray(x, np.int64).ravel() for x in lists)  # type: ignore[misc]
                for lists in zip(self.easy, self.hard, self.junk, strict=True)]

    @cached_property
    def listed(self) -> list[np.ndarray]:
        """Per query, its distinct listed indices (easy, hard and junk together)."""
        return [np.unique(np.concatenate(lists)) for lists in self.lists]

    @cached_property
    def overlaps(self) -> int:
        """Listed indices repeated within or across a query's lists."""
        pairs = zip(self.lists, self.listed, strict=True)
        return sum(sum(x.size for x in lists) - u.size for lists, u in pairs)

    def describe(self) -> dict[str, Any]:
        return {"protocol": self.name, "dataset": self.dataset, "queries": self.n_query,
                "database_images": self.n_database, "distractors": self.n_distractors,
                "easy": int(sum(len(x) for x in self.easy)), "hard": int(sum(len(x) for x in self.hard)),
                "junk": int(sum(len(x) for x in self.junk)), "repeated_indices": self.overlaps,
                "mp_at": list(self.ks), "block": self.block}

    def caveats(self) -> list[str]:
        if not self.overlaps:
            return []
        return [f"the ground truth repeats {self.overlaps} database indices within or across a query's easy, "
                "hard and junk lists: counted as the authors' compute_map counts them"]

    @property
    def headline(self) -> tuple[str, ...]:
        """Medium then Hard mAP: the two columns papers quote."""
        return ("map_medium", "map_hard")

    def evaluate_pair(self, query: torch.Tensor, gallery: torch.Tensor, dims: str) -> PairResult:
        if query.shape[0] != self.n_rows or gallery.shape[0] != self.n_rows:
            raise DataError(f"{self.dataset}: features have {query.shape[0]} / {gallery.shape[0]} rows; "
                            f"expected {self.n_rows} (queries, database, distractors)")
        nq = self.n_query
        ranked = set_ranking(query[:nq], gallery[nq:], self.listed, block=self.block)
        extra = f" + {self.n_distractors} distractors" if self.n_distractors else ""
        records: list[dict[str, Any]] = []
        per_k: list[dict[str, Any]] = []
        for setup in SETUPS:
            results = [setup_ap(items, ahead, *_setup_lists(*lists, setup), self.ks)
                       for (items, ahead), lists in zip(ranked, self.lists, strict=True)]
            done = [r for r in results if r is not None]
            n = len(done)
            desc = (f"revisited {self.dataset} (Radenovic et al. 2018), {setup} setup: {n} of {nq} cropped "
                    f"queries with a positive search {self.n_database} database images{extra}; junk removed, "
                    "AP and mP@k as the authors' compute_map; ties by database row; " + dims)
            mean_ap = float(np.mean([r[0] for r in done])) if n else float("nan")
            records.append({"metric": f"map_{setup}", "value": mean_ap, "n": n, "protocol": desc})
            for c, k in enumerate(self.ks):
                value = float(np.mean([r[1][c] for r in done])) if n else float("nan")
                per_k.append({"metric": f"mp@{k}_{setup}", "value": value, "n": n, "protocol": desc})
        return PairResult(records + per_k)
