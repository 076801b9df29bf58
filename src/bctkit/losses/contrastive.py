"""``contrastive``: InfoNCE between new and cached old features (UniBCT Eq. 12; methods.md item 4).

For sample i of the batch, with a_i = n(f_i[:d_o]) the anchor, n(o_i) the positive (cached old feature
of the same image) and n(o_j) for every batch sample j of ANOTHER class the negatives:

    s_ij = <a_i, n(o_j)> / tau,    l_i = -log( exp(s_ii) / (exp(s_ii) + sum_{j: y_j != y_i} exp(s_ij)) )

loss = weight * mean_i l_i. Other samples of the same class are neither positives nor negatives.
Under several processes the negatives are the old features of the whole global batch (looked up in
the cache by the step's global indices: old features carry no gradient, so nothing is communicated)
and each rank's anchors are its own rows, so the mean over ranks is the one-process loss.
``tau`` defaults to 0.07, the usual InfoNCE temperature (MoCo, SupCon); the UniBCT text available to
us does not state the value used for this baseline, so it is an option.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from bctkit.losses.base import CompatBatch, CompatibilityTerm, TermOutput, TermParams, register
from bctkit.losses.bct import old_features


class ContrastiveParams(TermParams):
    weight: float = Field(1.0, ge=0)
    tau: float = Field(0.07, gt=0)


@register
class Contrastive(CompatibilityTerm):
    """New feature pulled to its own old feature, pushed from other classes' old features."""

    name = "contrastive"
    Params = ContrastiveParams
    needs_old_features = True
    aligns_leading_dims = True
    params: ContrastiveParams



    def forward(self, batch: CompatBatch) -> TermOutput:
        f = batch.new_feats
        o = old_features(batch, self.name, f)
        y, y_all, o_all = batch.labels, batch.labels, o
        if batch.global_index is not None and self.ctx.old_train_feats is not None:
            o_all = self.ctx.old_train_feats[batch.global_index].to(device=f.device, dtype=f.dtype)
            y_all = self.ctx.train_labels[batch.global_index].to(y.device)
        anchor = F.normalize(f[:, : o.shape[1]], dim=1)
        sim = anchor @ F.normalize(o_all, dim=1).T / self.params.tau
        own = torch.arange(len(y), device=sim.device) + batch.offset
        eye = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, own[:, None], True)
        same_class_other = (y[:, None] == y_all[None, :]) & ~eye
        sim = sim.masked_fill(same_class_other, float("-inf"))
        raw = F.cross_entropy(sim, own)
        return TermOutput(self.params.weight * raw, {"contrastive": float(raw.detach())})
