"""The run's open-set protocol: every (query model, gallery model) pair on the held-out identities.

1:N closed-set identification: the first ``gallery_per_class`` images of each evaluation identity
form the gallery (embedded by the gallery model); every other image is a probe (query model).
1:1 verification: all pairs i < j of evaluation images; the first image is embedded by the query
model, the second by the gallery model (UniBCT's cross-test convention); exact TAR@FAR.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bctkit.evaluation.identification import cmc
from bctkit.evaluation.verification import roc_auc, tar_at_far
from bctkit.features import FeatureSet


def far_name(far: float) -> str:
    return f"tar@far={far:.0e}".replace("e-0", "e-")


@dataclass(frozen=True)
class EvalProtocol:
    dataset: str
    labels: torch.Tensor
    gallery_per_class: int
    fars: tuple[float, ...]
    topk: tuple[int, ...]

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


def comparable(query: FeatureSet, gallery: FeatureSet) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """The coordinates compared when ``query``'s model queries ``gallery``'s, or None if none are.

    Equal sizes compare whole embeddings; otherwise the side that declares ``compat_dims`` equal to
    the other's size is cut to its first ``compat_dims`` coordinates (BCT's rule for d_n > d_o).
    """
    q, g = query.feats, gallery.feats
    if q.shape[1] == g.shape[1]:
        return q, g, f"all {q.shape[1]} dims"
    if query.compat_dims == g.shape[1]:
        return q[:, : g.shape[1]], g, f"query dims [0:{g.shape[1]}]"
    if gallery.compat_dims == q.shape[1]:
        return q, g[:, : q.shape[1]], f"gallery dims [0:{q.shape[1]}]"
    return None


def evaluate_pair(
    query: torch.Tensor, gallery: torch.Tensor, protocol: EvalProtocol, dims: str
) -> list[dict[str, Any]]:
    """Metric records (without model names) for one query/gallery feature pair."""
    labels = protocol.labels
    g_idx, p_idx = protocol.split()
    ids = len(torch.unique(labels))
    records: list[dict[str, Any]] = []
    top = cmc(query[p_idx], labels[p_idx], gallery[g_idx], labels[g_idx], ks=protocol.topk)
    ident = (f"1:N closed-set CMC, {protocol.dataset}: gallery {len(g_idx)} images "
             f"({protocol.gallery_per_class}/id, {ids} ids), {len(p_idx)} probes; {dims}")
    for k, v in top.items():
        records.append({"metric": f"top{k}", "value": v, "n": len(p_idx), "protocol": ident})
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
    for far, v in tars.items():
        records.append({"metric": far_name(far), "value": v, "n": len(scores), "protocol": verif})
    records.append({"metric": "auc", "value": roc_auc(scores, genuine), "n": len(scores),
                    "protocol": verif.replace("exact TAR@FAR", "ROC AUC")})
    return records


def evaluate_models(features: dict[str, FeatureSet], protocol: EvalProtocol) -> list[dict[str, Any]]:
    """Records for every ordered (query model, gallery model) pair whose embeddings are comparable."""
    records: list[dict[str, Any]] = []
    for qname, qf in features.items():
        for gname, gf in features.items():
            view = comparable(qf, gf)
            if view is None:
                continue
            q, g, dims = view
            for rec in evaluate_pair(q, g, protocol, dims):
                records.append({"query_model": qname, "gallery_model": gname, **rec})
    return records
