"""Query/gallery retrieval: two image lists, each with its own identities.

The query images (embedded by the query model) search the gallery images (gallery model); rows
``0 .. n_query-1`` of :attr:`QueryGalleryProtocol.source` are the queries, the rest the gallery.
Identities are matched across the two lists by name (``label_name``: a list file's label, an image
folder's identity folder), never by each list's own integer labels. Gallery identities no query has
are distractors: they stay in every ranking as non-matches.

Metrics over the full ranking (definitions as in :mod:`bctkit.evaluation.retrieval`; ties: the lower
gallery row first): mAP, mAP@R and CMC top-k, averaged over the queries whose identity has at least
one gallery item (the others have no defined AP or rank). The ranking is counted in query x gallery
blocks (:mod:`bctkit.evaluation.blockwise`), so memory stays bounded by ``block`` whatever the
sizes, and the result is exact. With ``index`` (a faiss factory string such as "IVF1024,Flat" or
"HNSW32") the top-k come from that index instead, reported with the index's recall@k against the
exact top-k on the same queries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch

from bctkit.data.sources.base import DataSource, PathSource
from bctkit.data.sources.imagefolder import ImageFolderSource
from bctkit.data.sources.listfile import ListSource
from bctkit.data.sources.market import ConcatSource
from bctkit.errors import DataError
from bctkit.evaluation.blockwise import full_ranking, indexed_cmc, summarize, top1_hits
from bctkit.evaluation.protocols.base import PairResult, Protocol
from bctkit.evaluation.protocols.split import CMC_CURVE_RANKS

__all__ = ["QueryGalleryProtocol", "RankingOptions", "ranking_records"]


@dataclass(frozen=True)
class RankingOptions:
    """How the full ranking is computed: ``block`` query rows per block (memory), ``index`` an
    optional faiss factory string for the top-k (``nprobe`` for IVF indexes)."""

    ks: tuple[int, ...] = (1, 5, 10)
    block: int = 1024
    index: str | None = None
    nprobe: int | None = None

    def describe(self) -> dict[str, Any]:
        return {"topk": list(self.ks), "block": self.block, "index": self.index, "nprobe": self.nprobe}


def ranking_records(
    query: torch.Tensor,
    gallery: torch.Tensor,
    qids: np.ndarray,
    gids: np.ndarray,
    options: RankingOptions,
    desc: str,
    *,
    qcams: np.ndarray | None = None,
    gcams: np.ndarray | None = None,
    junk: np.ndarray | None = None,
    ap: str = "ap",
    map_at_r: bool = True,
) -> PairResult:
    """Records (map, map@r, top-k; index_recall@k with an index), the CMC curve and (exact top-k
    only) each query's top-1 hit, of one pair."""
    n_gallery = len(gids) - (0 if junk is None else int(np.sum(junk)))
    too_far = [k for k in options.ks if k > n_gallery]
    if too_far:
        raise DataError(f"top-k {too_far[0]} exceeds the gallery of {n_gallery} images "
                        f"(junk removed): top-{too_far[0]} would be 100 %")
    ranks = sorted(set(options.ks) | {k for k in CMC_CURVE_RANKS if k <= n_gallery})
    per = full_ranking(query, qids, gallery, gids, query_cams=qcams, gallery_cams=gcams, gallery_junk=junk,
                       block=options.block)
    summary = summarize(per, ks=ranks, ap=ap)
    n = int(summary["n_queries"])
    records = [{"metric": "map", "value": summary["map"], "n": n, "protocol": desc}]
    if map_at_r:
        records.append({"metric": "map@r", "value": summary["map_at_r"], "n": n, "protocol": desc})
    curve = {k: summary[f"top{k}"] for k in ranks}
    if options.index is None:
        records += [{"metric": f"top{k}", "value": curve[k], "n": n, "protocol": desc} for k in options.ks]
        return PairResult(records, cmc=curve, top1_hits=top1_hits(per))
    approx = indexed_cmc(query, qids, gallery, gids, options.ks, options.index, nprobe=options.nprobe,
                         query_cams=qcams, gallery_cams=gcams, gallery_junk=junk, block=options.block)
    idesc = f"{desc}; top-k from faiss index {options.index!r} (nprobe {options.nprobe})"
    for k in options.ks:
        records.append({"metric": f"top{k}", "value": approx[f"top{k}"], "n": n, "protocol": idesc})
        records.append({"metric": f"index_recall@{k}", "value": approx[f"index_recall@{k}"],
                        "n": len(qids), "protocol": idesc + ", share of the exact top-k it returned"})
    return PairResult(records, cmc=curve)  # the index's top-1 is approximate: no flips from it


@dataclass(frozen=True, eq=False)
class QueryGalleryProtocol(Protocol):
    """Queries search a separate gallery (the module docstring says how). ``labels`` are the
    source's name-matched labels: rows ``< n_query`` the queries, the rest the gallery."""

    dataset: str
    labels: np.ndarray
    n_query: int
    source: DataSource | None = None
    options: RankingOptions = field(default_factory=RankingOptions)

    name: ClassVar[str] = "retrieval"

    def __post_init__(self) -> None:
        if not 0 < self.n_query < len(self.labels):
            raise DataError(f"{self.dataset}: need at least one query and one gallery image, got "
                            f"{self.n_query} queries of {len(self.labels)} images")

    @classmethod
    def from_sources(cls, query: DataSource, gallery: DataSource, dataset: str | None = None,
                     options: RankingOptions | None = None) -> QueryGalleryProtocol:
        """Protocol over ``query`` then ``gallery`` images, identities matched by ``label_name``."""
        source = ConcatSource([query, gallery], name=f"{query.name} -> {gallery.name}")
        return cls(dataset or source.name, source.labels, len(query), source, options or RankingOptions())

    @classmethod
    def from_lists(cls, query_file: str | os.PathLike[str], gallery_file: str | os.PathLike[str],
                   dataset: str | None = None, options: RankingOptions | None = None) -> QueryGalleryProtocol:
        """From two ``path label`` list files (labels are names: equal numbers = same identity)."""
        return cls.from_sources(ListSource(query_file), ListSource(gallery_file), dataset, options)

    @classmethod
    def from_folders(cls, query_root: str | os.PathLike[str], gallery_root: str | os.PathLike[str],
                     dataset: str | None = None, options: RankingOptions | None = None
                     ) -> QueryGalleryProtocol:
        """From two ``root/<identity>/<image>`` folders (identity = folder name)."""
        return cls.from_sources(ImageFolderSource(query_root), ImageFolderSource(gallery_root), dataset,
                                options)

    @cached_property
    def self_matches(self) -> int:
        """Queries whose image file is also a gallery image (the same path once the folders are
        resolved): each finds itself. 0 when the images are not files of a query and a gallery
        source (a copy of an image at another path is not detected)."""
        parts = getattr(self.source, "parts", ())
        if len(parts) != 2 or not all(isinstance(p, PathSource) for p in parts):
            return 0

        def files(src: PathSource) -> np.ndarray:
            base = os.path.realpath(src.folder)
            return np.asarray([os.path.normpath(os.path.join(base, src.paths[i])) for i in range(len(src))])

        return int(np.isin(files(parts[0]), files(parts[1])).sum())

    def caveats(self) -> list[str]:
        n = self.self_matches
        if not n:
            return []
        return [f"{n} of {self.n_query} queries are also gallery images (the same files): each matches "
                "itself, so self tests (top-1, mAP) are inflated up to 100 % and a new model's cross test "
                "is judged against that; give query and gallery images that differ, or evaluate one set "
                "leave-one-out (--protocol loo)"]

    def _counts(self) -> dict[str, int]:
        q, g = self.labels[: self.n_query], self.labels[self.n_query :]
        return {"queries": self.n_query, "gallery_images": len(g),
                "query_identities": len(np.unique(q)), "gallery_identities": len(np.unique(g)),
                "queries_with_match": int(np.isin(q, g).sum()),
                "distractor_identities": len(np.setdiff1d(np.unique(g), q))}

    def describe(self) -> dict[str, Any]:
        return {"protocol": self.name, "dataset": self.dataset, **self._counts(),
                "queries_also_in_gallery": self.self_matches, **self.options.describe()}

    @property
    def headline(self) -> tuple[str, ...]:
        """mAP (always exact, what retrieval and re-id results are quoted by), then rank-1."""
        return ("map", "top1")

    def evaluate_pair(self, query: torch.Tensor, gallery: torch.Tensor, dims: str) -> PairResult:
        if query.shape[0] != len(self.labels) or gallery.shape[0] != len(self.labels):
            raise DataError(f"{self.dataset}: features have {query.shape[0]} / {gallery.shape[0]} rows; "
                            f"expected {len(self.labels)} (queries then gallery)")
        c = self._counts()
        desc = (f"query/gallery retrieval, {self.dataset}: {c['queries_with_match']} of {c['queries']} "
                f"queries with a gallery match search {c['gallery_images']} gallery images "
                f"({c['gallery_identities']} ids, {c['distractor_identities']} distractor ids); "
                f"full ranking, ties by gallery row; {dims}")
        return ranking_records(query[: self.n_query], gallery[self.n_query :], self.labels[: self.n_query],
                               self.labels[self.n_query :], self.options, desc)
