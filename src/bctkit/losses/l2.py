"""``l2``: regress new features onto the old ones of the same image (AML; methods.md item 2).

Default form (MixBCT code): weight * mean(max(0, ||n(o) - n(f)|| - threshold)); threshold 0 is plain
L2, 0.2 the "weakened L2". ``squared=True, normalize=False`` gives the original AML form
weight * mean ||f - o||^2. When d_n > d_o the first d_o coordinates are regressed (and compared).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from bctkit.losses.base import CompatBatch, CompatibilityTerm, TermOutput, TermParams, register


class L2Params(TermParams):
    weight: float = Field(10.0, ge=0)
    threshold: float = Field(0.0, ge=0)
    normalize: bool = True
    squared: bool = False


@register
class L2(CompatibilityTerm):
    """Feature regression onto cached old features."""

    name = "l2"
    Params = L2Params
    needs_old_features = True
    aligns_leading_dims = True
    params: L2Params



    def forward(self, batch: CompatBatch) -> TermOutput:
        if batch.old_feats is None:
            raise ValueError("l2 needs cached old features")
        f = batch.new_feats[:, : batch.old_feats.shape[1]]
        o = batch.old_feats
        if self.params.normalize:
            f, o = F.normalize(f, dim=1), F.normalize(o, dim=1)
        diff = f - o
        dist = diff.square().sum(1) if self.params.squared else diff.norm(dim=1)
        raw = (dist - self.params.threshold).clamp_min(0).mean()
        return TermOutput(self.params.weight * raw, {"l2": float(raw.detach())})
