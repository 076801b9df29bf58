"""The run's open-set protocol: every (query model, gallery model) pair on the held-out identities.

- 1:N closed-set identification (CMC top-k): the first ``gallery_per_class`` images of each
  evaluation identity form the gallery (embedded by the gallery model); every other image is a
  probe (query model).
- 1:N open-set identification (TPIR@FPIR, NIST rule): the identities are split in two halves; G1
  enrols the gallery images of the first half, G2 those of the second; all probes search each
  gallery (probes of the other half are the non-mated searches); the two results are averaged.
- 1:1 verification: all pairs i < j of evaluation images; the first image is embedded by the query
  model, the second by the gallery model (UniBCT's cross-test convention); exact TAR@FAR, ROC AUC.
  Computed block by block without the N x N score matrix (:mod:`evaluation.allpairs`: row blocks of
  max(256, 2^20 / N) rows, every genuine score, the largest impostor scores the FARs need, an
  impostor histogram).
- Retrieval: every image queries all the others (its own item excluded): mAP and mAP@R, from the
  blockwise full ranking (:func:`evaluation.blockwise.full_ranking`: 64 MiB score tiles).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from bctkit.errors import DataError
from bctkit.evaluation.allpairs import allpairs_verification
from bctkit.evaluation.blockwise import full_ranking, summarize
from bctkit.evaluation.identification import cmc, tpir_at_fpir
from bctkit.evaluation.protocols.base import PairResult, Protocol, rate_name

CMC_CURVE_RANKS = (1, 2, 3, 5, 10, 20)


@dataclass(frozen=True)
class EvalProtocol(Protocol):
    """The run's own split of one labelled image set (the module docstring says how)."""

    dataset: str
    labels: torch.Tensor
    gallery_per_class: int
    fars: tuple[float, ...]
    topk: tuple[int, ...]
    fpirs: tuple[float, ...] = ()
    retrieval: bool = True
    identification: bool = True
    verification: bool = True

    name: ClassVar[str] = "split"

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gallery indices, probe indices): the first images of each identity are the gallery."""
        order = torch.argsort(self.labels, stable=True)
        sorted_labels = self.labels[order]
        first = torch.ones_like(sorted_labels, dtype=torch.bool)
        first[1:] = sorted_labels[1:] != sorted_labels[:-1]
        start = torch.cummax(torch.where(first, torch.arange(len(order)), 0), 0).values
        rank = torch.arange(len(order)) - start
        in_gallery = torch.zeros(len(order), dtype=torch.bool)
        in_gallery[order] = rank < self.gallery_per_class
        return torch.nonzero(in_gallery).flatten(), torch.nonzero(~in_gallery).flatten()

    def describe(self) -> dict[str, Any]:
        g_idx, p_idx = self.split()
        return {"protocol": self.name, "dataset": self.dataset, "images": len(self.labels),
                "identities": len(torch.unique(self.labels)), "gallery_per_class": self.gallery_per_class,
                "gallery_images": len(g_idx), "probes": len(p_idx), "fars": list(self.fars),
                "fpirs": list(self.fpirs), "topk": list(self.topk)}

    @property
    def backfill(self) -> bool:
        return self.identification

    def evaluate_pair(self, query: torch.Tensor, gallery: torch.Tensor, dims: str) -> PairResult:
        return evaluate_pair(query, gallery, self, dims)


def _open_set(query: torch.Tensor, gallery: torch.Tensor, protocol: EvalProtocol, dims: str,
              g_idx: torch.Tensor, p_idx: torch.Tensor) -> list[dict[str, Any]]:
    labels = protocol.labels
    ids = torch.unique(labels)
    halves = (ids[: len(ids) // 2], ids[len(ids) // 2 :])
    results = []
    for half in halves:
        enrolled = g_idx[torch.isin(labels[g_idx], half)]
        results.append(tpir_at_fpir(query[p_idx], labels[p_idx], gallery[enrolled], labels[enrolled],
                                    protocol.fpirs))
    desc = (f"1:N open-set TPIR@FPIR (NIST: mated score strictly above every other identity's and the "
            f"threshold), {protocol.dataset}: galleries G1/G2 = gallery "
            f"images of {len(halves[0])} / {len(halves[1])} ids, {len(p_idx)} probes each, averaged; {dims}")
    return [{"metric": rate_name("tpir@fpir", f), "value": float(np.mean([r[f] for r in results])),
             "n": len(p_idx), "protocol": desc} for f in protocol.fpirs]


def _identification(query: torch.Tensor, gallery: torch.Tensor, protocol: EvalProtocol,
                    dims: str, hits: list[torch.Tensor]) -> tuple[list[dict[str, Any]], dict[int, float]]:
    labels = protocol.labels
    g_idx, p_idx = protocol.split()
    ids = len(torch.unique(labels))
    too_far = [k for k in protocol.topk if k > len(g_idx)]
    if too_far:
        raise DataError(f"top-k {too_far[0]} (evaluation.topk / --topk) exceeds the gallery of "
                        f"{len(g_idx)} images ({protocol.gallery_per_class}/id, {ids} ids): "
                        f"top-{too_far[0]} would be 100 %")
    ranks = sorted(set(protocol.topk) | {k for k in CMC_CURVE_RANKS if k <= len(g_idx)})
    curve = cmc(query[p_idx], labels[p_idx], gallery[g_idx], labels[g_idx], ks=ranks, hits_out=hits)
    ident = (f"1:N closed-set CMC, {protocol.dataset}: gallery {len(g_idx)} images "
             f"({protocol.gallery_per_class}/id, {ids} ids), {len(p_idx)} probes; {dims}")
    records = [{"metric": f"top{k}", "value": curve[k], "n": len(p_idx), "protocol": ident}
               for k in protocol.topk]
    if protocol.fpirs:
        records += _open_set(query, gallery, protocol, dims, g_idx, p_idx)
    return records, curve


def _verification(query: torch.Tensor, gallery: torch.Tensor, protocol: EvalProtocol,
                  dims: str) -> tuple[list[dict[str, Any]], tuple[np.ndarray, np.ndarray]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = allpairs_verification(query, gallery, protocol.labels, protocol.fars)
    verif = (f"1:1 verification, {protocol.dataset}: all {res.n_pairs} pairs i<j "
             f"({res.n_genuine} genuine, {res.n_impostor} impostor), first image by query model; "
             f"exact TAR@FAR; {dims}")
    records = [{"metric": rate_name("tar@far", far), "value": v, "n": res.n_pairs, "protocol": verif}
               for far, v in res.tar.items()]
    records.append({"metric": "auc", "value": res.auc, "n": res.n_pairs,
                    "protocol": verif.replace("exact TAR@FAR", "ROC AUC")})
    return records, (res.fpr, res.tpr)


def _retrieval(query: torch.Tensor, gallery: torch.Tensor, protocol: EvalProtocol,
               dims: str) -> list[dict[str, Any]]:
    labels = protocol.labels
    ret = summarize(full_ranking(query, labels, gallery, labels, exclude_self=True), ks=(1,))
    desc = (f"retrieval, {protocol.dataset}: each of {len(labels)} images queries the other "
            f"{len(labels) - 1} (own item excluded); {dims}")
    return [{"metric": name, "value": ret[key], "n": int(ret["n_queries"]), "protocol": desc}
            for key, name in (("map", "map"), ("map_at_r", "map@r"))]


def evaluate_pair(
    query: torch.Tensor, gallery: torch.Tensor, protocol: EvalProtocol, dims: str
) -> PairResult:
    """Metric records (without model names) and curves for one query/gallery feature pair."""
    result = PairResult([])
    if protocol.identification:
        hits: list[torch.Tensor] = []
        records, result.cmc = _identification(query, gallery, protocol, dims, hits)
        result.records += records
        result.top1_hits = hits[0] if hits else None
    if protocol.verification:
        records, result.roc = _verification(query, gallery, protocol, dims)
        result.records += records
    if protocol.retrieval:
        result.records += _retrieval(query, gallery, protocol, dims)
    return result
