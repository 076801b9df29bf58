"""The run's open-set protocol: every (query model, gallery model) pair on the held-out identities.

- 1:N closed-set identification (CMC top-k): the first ``gallery_per_class`` images of each
  evaluation identity form the gallery (embedded by the gallery model); every other image is a
  probe (query model).
- 1:N open-set identification (TPIR@FPIR, NIST rule): the identities are split in two halves; G1
  enrols the gallery images of the first half, G2 those of the second; all probes search each
  gallery (probes of the other half are the non-mated searches); the two results are averaged.
- 1:1 verification: all pairs i < j of evaluation images; the first image is embedded by the query
  model, the second by the gallery model (UniBCT's cross-test convention); exact TAR@FAR, ROC AUC.
- Retrieval: every image queries all the others (its own item excluded): mAP and mAP@R.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bctkit.errors import DataError
from bctkit.evaluation.identification import cmc, tpir_at_fpir
from bctkit.evaluation.retrieval import retrieval_metrics
from bctkit.evaluation.verification import roc_auc, roc_curve, tar_at_far
from bctkit.features import FeatureSet

CMC_CURVE_RANKS = (1, 2, 3, 5, 10, 20)


def rate_name(kind: str, rate: float) -> str:
    """Metric name such as ``tar@far=1e-4`` or ``tpir@fpir=1e-2``."""
    return f"{kind}={rate:.0e}".replace("e-0", "e-")


@dataclass(frozen=True)
class EvalProtocol:
    dataset: str
    labels: torch.Tensor
    gallery_per_class: int
    fars: tuple[float, ...]
    topk: tuple[int, ...]
    fpirs: tuple[float, ...] = ()
    retrieval: bool = True
    identification: bool = True
    verification: bool = True

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


@dataclass
class PairResult:
    """Records of one (query, gallery) pair plus the curves behind them, for plots."""

    records: list[dict[str, Any]]
    roc: tuple[np.ndarray, np.ndarray] | None = None
    cmc: dict[int, float] = field(default_factory=dict)


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
                    dims: str) -> tuple[list[dict[str, Any]], dict[int, float]]:
    labels = protocol.labels
    g_idx, p_idx = protocol.split()
    ids = len(torch.unique(labels))
    too_far = [k for k in protocol.topk if k > len(g_idx)]
    if too_far:
        raise DataError(f"top-k {too_far[0]} (evaluation.topk / --topk) exceeds the gallery of "
                        f"{len(g_idx)} images ({protocol.gallery_per_class}/id, {ids} ids): "
                        f"top-{too_far[0]} would be 100 %")
    ranks = sorted(set(protocol.topk) | {k for k in CMC_CURVE_RANKS if k <= len(g_idx)})
    curve = cmc(query[p_idx], labels[p_idx], gallery[g_idx], labels[g_idx], ks=ranks)
    ident = (f"1:N closed-set CMC, {protocol.dataset}: gallery {len(g_idx)} images "
             f"({protocol.gallery_per_class}/id, {ids} ids), {len(p_idx)} probes; {dims}")
    records = [{"metric": f"top{k}", "value": curve[k], "n": len(p_idx), "protocol": ident}
               for k in protocol.topk]
    if protocol.fpirs:
        records += _open_set(query, gallery, protocol, dims, g_idx, p_idx)
    return records, curve


def _verification(query: torch.Tensor, gallery: torch.Tensor, protocol: EvalProtocol,
                  dims: str) -> tuple[list[dict[str, Any]], tuple[np.ndarray, np.ndarray]]:
    labels = protocol.labels
    qn, gn = F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    i, j = torch.triu_indices(len(labels), len(labels), offset=1)
    scores = (qn @ gn.T)[i, j].numpy().astype(np.float64)
    genuine = (labels[i] == labels[j]).numpy().astype(np.int64)
    n_gen = int(genuine.sum())
    verif = (f"1:1 verification, {protocol.dataset}: all {len(scores)} pairs i<j "
             f"({n_gen} genuine, {len(scores) - n_gen} impostor), first image by query model; "
             f"exact TAR@FAR; {dims}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tars = tar_at_far(scores, genuine, protocol.fars)
    records = [{"metric": rate_name("tar@far", far), "value": v, "n": len(scores), "protocol": verif}
               for far, v in tars.items()]
    records.append({"metric": "auc", "value": roc_auc(scores, genuine), "n": len(scores),
                    "protocol": verif.replace("exact TAR@FAR", "ROC AUC")})
    fpr, tpr, _ = roc_curve(scores, genuine)
    return records, (fpr, tpr)


def _retrieval(query: torch.Tensor, gallery: torch.Tensor, protocol: EvalProtocol,
               dims: str) -> list[dict[str, Any]]:
    labels = protocol.labels
    ret = retrieval_metrics(query, labels, gallery, labels, ks=(1,), exclude_self=True)
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
        records, result.cmc = _identification(query, gallery, protocol, dims)
        result.records += records
    if protocol.verification:
        records, result.roc = _verification(query, gallery, protocol, dims)
        result.records += records
    if protocol.retrieval:
        result.records += _retrieval(query, gallery, protocol, dims)
    return result


def evaluate_models(
    features: dict[str, FeatureSet], protocol: EvalProtocol, progress: bool = False
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], PairResult]]:
    """Records for every ordered (query model, gallery model) pair whose embeddings are comparable,
    and the per-pair results (with curves) keyed by (query, gallery)."""
    records: list[dict[str, Any]] = []
    pairs: dict[tuple[str, str], PairResult] = {}
    todo = [(qn, gn, view) for qn, qf in features.items() for gn, gf in features.items()
            if (view := comparable(qf, gf)) is not None]
    bar = tqdm(todo, desc="metrics", unit="pair", disable=not progress, leave=False)
    for qname, gname, (q, g, dims) in bar:
        res = evaluate_pair(q, g, protocol, dims)
        pairs[(qname, gname)] = res
        for rec in res.records:
            records.append({"query_model": qname, "gallery_model": gname, **rec})
    return records, pairs
