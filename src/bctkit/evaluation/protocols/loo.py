"""Leave-one-out retrieval over one labelled image set: BCT's and BT^2's evaluation (CIFAR-100 test,
ImageNet val), where every image queries all the others.

Image i, embedded by the query model, searches every other image of the set, embedded by the gallery
model: the relevant items are the other images of its class, and image i's own gallery row is removed
from its ranking before anything is counted (in the cross test that row is the old model's embedding
of the very same image, which would otherwise be an easy match; it is neither a hit nor ranked ahead
of one). Metrics over the full ranking (decreasing cosine score, equal scores with the lower gallery
row first):

- ``top{k}`` (default k = 1, 5): the share of queries with at least one relevant image among their k
  nearest other images (BCT's top-k accuracy);
- ``map``: mean over queries of AP, the mean of the precision at each relevant image's rank.

An image that is the only one of its class has no relevant item: it has no AP and no rank, and is left
out of every mean (``n`` counts the queries that remain; ``caveats`` says how many were left out).
Counted blockwise (:mod:`bctkit.evaluation.blockwise`): exact, memory bounded by ``block`` whatever the
set's size (50,000 x 50,000 is a few hundred MiB).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch

from bctkit.data.sources.base import DataSource
from bctkit.errors import DataError
from bctkit.evaluation.blockwise import full_ranking, summarize, top1_hits
from bctkit.evaluation.protocols.base import PairResult, Protocol
from bctkit.evaluation.protocols.split import CMC_CURVE_RANKS

__all__ = ["LeaveOneOutProtocol"]


@dataclass(frozen=True, eq=False)
class LeaveOneOutProtocol(Protocol):
    """Leave-one-out over ``labels`` (one per image, rows of ``source`` when given); ``ks`` the top-k
    ranks, ``block`` query rows per block (memory). The module docstring gives the rules."""

    dataset: str
    labels: np.ndarray
    source: DataSource | None = None
    ks: tuple[int, ...] = (1, 5)
    block: int = 1024

    name: ClassVar[str] = "loo"

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or len(labels) < 2:
            raise DataError(f"{self.dataset}: leave-one-out needs a 1-D label per image and at least two "
                            f"images, got shape {list(labels.shape)}")
        if self.source is not None and len(self.source) != len(labels):
            raise DataError(f"{self.dataset}: {len(labels)} labels for {len(self.source)} images")
        if self.with_match == 0:
            raise DataError(f"{self.dataset}: no class has two images; leave-one-out has nothing to find")
        if not self.ks or min(self.ks) < 1 or max(self.ks) > len(labels) - 1:
            raise DataError(f"{self.dataset}: top-k {list(self.ks)}: each k must lie in "
                            f"[1, {len(labels) - 1}] (the other images of the set)")
        if self.block < 1:
            raise DataError(f"block must be >= 1, got {self.block}")

    @classmethod
    def from_source(cls, source: DataSource, dataset: str | None = None, ks: tuple[int, ...] = (1, 5),
                    block: int = 1024) -> LeaveOneOutProtocol:
        """Leave-one-out over ``source``'s images and labels."""
        return cls(dataset or source.name, np.asarray(source.labels), source, tuple(ks), block)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], dataset: str | None = None,
                  ks: tuple[int, ...] = (1, 5), block: int = 1024) -> LeaveOneOutProtocol:
        """Over the labelled set at ``path``: anything ``open_dataset`` reads (an image folder
        ``root/<class>/<image>``, a ``path label`` list file, a RecordIO set)."""
        from bctkit.data.datasets import open_dataset

        return cls.from_source(open_dataset(path), dataset, ks, block)

    @cached_property
    def with_match(self) -> int:
        """Images with at least one other image of their class: the queries that count."""
        _, inverse, counts = np.unique(np.asarray(self.labels), return_inverse=True, return_counts=True)
        return int((counts[inverse.ravel()] > 1).sum())

    def describe(self) -> dict[str, Any]:
        n = len(self.labels)
        return {"protocol": self.name, "dataset": self.dataset, "images": n,
                "classes": len(np.unique(np.asarray(self.labels))), "queries_with_match": self.with_match,
                "singleton_images": n - self.with_match, "topk": list(self.ks), "block": self.block}

    def caveats(self) -> list[str]:
        alone = len(self.labels) - self.with_match
        if not alone:
            return []
        return [f"{alone} of {len(self.labels)} images are the only image of their class: with nothing "
                "to find they are left out of top-k and mAP (each record's n counts the rest)"]

    @property
    def headline(self) -> tuple[str, ...]:
        """top-1 (BCT's criterion and both papers' first column), then mAP."""
        return ("top1", "map")

    def evaluate_pair(self, query: torch.Tensor, gallery: torch.Tensor, dims: str) -> PairResult:
        n = len(self.labels)
        if query.shape[0] != n or gallery.shape[0] != n:
            raise DataError(f"{self.dataset}: features have {query.shape[0]} / {gallery.shape[0]} rows; "
                            f"expected {n} (one per image)")
        classes = len(np.unique(np.asarray(self.labels)))
        desc = (f"leave-one-out, {self.dataset}: each image with another of its class ({self.with_match} of "
                f"{n}, {classes} classes) searches the {n - 1} others, its own gallery row removed; full "
                f"ranking, ties by gallery row; {dims}")
        ranks = sorted(set(self.ks) | {k for k in CMC_CURVE_RANKS if k <= n - 1})
        per = full_ranking(query, self.labels, gallery, self.labels, exclude_self=True, block=self.block)
        summary = summarize(per, ks=ranks)
        count = int(summary["n_queries"])
        records = [{"metric": f"top{k}", "value": summary[f"top{k}"], "n": count, "protocol": desc}
                   for k in self.ks]
        records.append({"metric": "map", "value": summary["map"], "n": count, "protocol": desc})
        return PairResult(records, cmc={k: summary[f"top{k}"] for k in ranks},
                          top1_hits=top1_hits(per))
