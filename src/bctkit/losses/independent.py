"""``independent``: no compatibility term. Its new/new result is the paragon."""

from __future__ import annotations

import torch

from bctkit.losses.base import CompatBatch, CompatibilityTerm, TermOutput, register


@register
class Independent(CompatibilityTerm):
    """The new model trained with its base loss only."""

    name = "independent"

    def forward(self, batch: CompatBatch) -> TermOutput:
        return TermOutput(torch.zeros((), device=batch.new_feats.device))
