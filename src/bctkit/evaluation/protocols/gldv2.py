"""Google Landmarks Dataset v2's retrieval test (Weyand et al., CVPR 2020; the Kaggle Landmark
Retrieval 2019 challenge): the Public and Private test queries search the index. Data:
:mod:`bctkit.data.sources.gldv2_retrieval`.

Metric: mAP@100 as the challenge defines it. For a query q with m_q relevant index images and its
top-100 index images by cosine score (exact search, equal scores with the lower index row first),
AP@100(q) = (1 / min(m_q, 100)) * sum_{k=1..100} P_q(k) rel_q(k), P_q(k) the precision of the first k
and rel_q(k) whether the k-th is relevant. Records: the mean over the Public queries
(``map@100_public``), over the Private ones (``map@100_private``) and over both (``map@100``, the
headline: the most queries). Test images marked Ignored are neither embedded nor counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from bctkit.data.sources.base import DataSource
from bctkit.data.sources.gldv2_retrieval import USAGES, gldv2_source
from bctkit.errors import DataError
from bctkit.evaluation.protocols.base import PairResult, Protocol
from bctkit.evaluation.search import topk_search

__all__ = ["GLDv2Protocol", "average_precision_at"]


def average_precision_at(top: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """AP@k of one query: ``top`` its ranked index rows (at most k used), ``relevant`` its relevant
    rows (distinct, at least one)."""
    hits = np.isin(top[:k], relevant)
    precision = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float(np.sum(precision * hits) / min(relevant.size, k))


@dataclass(frozen=True, eq=False)
class GLDv2Protocol(Protocol):
    """GLDv2 retrieval (module docstring): per query its ``relevant`` index rows and ``usage``
    (Public / Private); feature rows are the queries, then the ``n_index`` index images. ``k``: the
    cut-off (100), ``block``: queries per search block (memory)."""

    dataset: str
    relevant: tuple[np.ndarray, ...]
    usage: tuple[str, ...]
    n_index: int
    source: DataSource | None = None
    k: int = 100
    block: int = 1024

    name: ClassVar[str] = "gldv2"

    def __post_init__(self) -> None:
        if not self.relevant or len(self.usage) != len(self.relevant):
            raise DataError(f"{self.dataset}: need a usage and a relevant list for each of at least one "
                            "query")
        for i, (rel, use) in enumerate(zip(self.relevant, self.usage, strict=True)):
            r = np.asarray(rel)
            if use not in USAGES:
                raise DataError(f"{self.dataset}: query {i}: usage {use!r}, expected Public or Private")
            if r.size == 0 or r.min() < 0 or r.max() >= self.n_index or np.unique(r).size != r.size:
                raise DataError(f"{self.dataset}: query {i}: relevant rows must be distinct, at least one, "
                                f"in [0, {self.n_index})")
        if self.source is not None and len(self.source) != self.n_rows:
            raise DataError(f"{self.dataset}: source has {len(self.source)} images; expected {self.n_rows}")
        if self.k < 1 or self.block < 1:
            raise DataError(f"{self.dataset}: k and block must be >= 1")

    @classmethod
    def from_root(cls, root: str | os.PathLike[str], dataset: str = "gldv2", block: int = 1024
                  ) -> GLDv2Protocol:
        """From a GLDv2 root (test/, index/, retrieval_solution_v2.1.csv, index.csv)."""
        source, sol, n_index = gldv2_source(root)
        return cls(dataset, tuple(sol.relevant), tuple(sol.usage), n_index, source, block=block)

    @property
    def n_query(self) -> int:
        return len(self.relevant)

    @property
    def n_rows(self) -> int:
        return self.n_query + self.n_index

    def describe(self) -> dict[str, Any]:
        use = np.asarray(self.usage)
        pairs = int(sum(np.asarray(r).size for r in self.relevant))
        return {"protocol": self.name, "dataset": self.dataset, "queries": self.n_query,
                "public_queries": int((use == "Public").sum()),
                "private_queries": int((use == "Private").sum()), "index_images": self.n_index,
                "relevant_pairs": pairs, "k": self.k, "block": self.block}

    @property
    def headline(self) -> tuple[str, ...]:
        """mAP@100 over all queries (the most queries), then over the Private ones (the leaderboard)."""
        return (f"map@{self.k}", f"map@{self.k}_private")

    def evaluate_pair(self, query: torch.Tensor, gallery: torch.Tensor, dims: str) -> PairResult:
        if query.shape[0] != self.n_rows or gallery.shape[0] != self.n_rows:
            raise DataError(f"{self.dataset}: features have {query.shape[0]} / {gallery.shape[0]} rows; "
                            f"expected {self.n_rows} (queries, then index)")
        nq = self.n_query
        top = topk_search(query[:nq], gallery[nq:], self.k, block_queries=self.block, cosine=True)[1].numpy()
        aps = np.asarray([average_precision_at(top[i], np.asarray(rel, np.int64), self.k)
                          for i, rel in enumerate(self.relevant)])
        use = np.asarray(self.usage)
        records = []
        for suffix, mask in (("", np.ones(nq, bool)), ("_public", use == "Public"),
                             ("_private", use == "Private")):
            n = int(mask.sum())
            if not n:
                continue
            which = "Public and Private" if not suffix else suffix[1:].capitalize()
            desc = (f"GLDv2 retrieval, {self.dataset}: {n} {which} queries search {self.n_index} index "
                    f"images; mAP@{self.k} as the challenge's (AP over the top {self.k}, divided by "
                    f"min(relevant, {self.k})); exact cosine search, ties by index row; {dims}")
            records.append({"metric": f"map@{self.k}{suffix}", "value": float(aps[mask].mean()), "n": n,
                            "protocol": desc})
        return PairResult(records)
