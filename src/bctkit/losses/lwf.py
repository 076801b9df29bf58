"""``lwf``: the Learning-without-Forgetting baseline of the BCT paper (methods.md item 3).

A TRAINABLE copy W' of the old classifier (same head form, initialised from ``ctx.old_head``; a term
parameter, so it is optimised and checkpointed with the model) is fitted on the new features to the
old model's soft labels of the same images:

    loss = weight * KL( softmax(z_o(o) / T) || softmax(z'(f[:d_o]) / T) )

averaged over the batch, where z(x) are logits without margin (W x + b for softmax, s * cos(x, w_j)
for cosine heads), o the cached old feature and f the new one. KL equals the cross entropy of the
soft labels minus their (constant) entropy: the same gradients, and a value that is 0 at agreement.
The frozen old classifier itself constrains nothing: only its soft labels are used, so the new
features need not stay compatible with it. ``temperature=None``: T = s of a cosine head, 1 for
softmax (as ``bct`` with ``kd``). No T^2 factor.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field

from bctkit.errors import ConfigError, DataError
from bctkit.losses.base import CompatBatch, CompatContext, CompatibilityTerm, TermOutput, TermParams, register
from bctkit.losses.bct import (
    default_temperature,
    frozen_classifier,
    old_features,
)
from bctkit.models.heads import Head


class LwFParams(TermParams):
    weight: float = Field(1.0, ge=0)
    temperature: float | None = Field(None, gt=0)


@register
class LwF(CompatibilityTerm):
    """Soft labels of the old model on new images, learnt by a trainable copy of its classifier."""

    name = "lwf"
    Params = LwFParams
    needs_old_features = True
    aligns_leading_dims = True
    params: LwFParams
    teacher: Head
    student: Head

    def uses_old_classifier(self) -> bool:
        return True

    def setup(self, ctx: CompatContext) -> None:
        """Frozen teacher (buffers) and trainable student W', both copies of the old head."""
        super().setup(ctx)
        head = ctx.old_head
        if head is None:
            raise ConfigError("lwf: needs the old classifier (ctx.old_head is None)")
        if head.weight.ndim != 2 or head.weight.shape[1] != ctx.old_embedding_dim:
            raise DataError(
                f"lwf: old classifier weight has shape {tuple(head.weight.shape)}; expected "
                f"(num_old_classes, {ctx.old_embedding_dim})"
            )
        self.teacher = frozen_classifier(head)
        student = copy.deepcopy(head)
        student.requires_grad_(True)
        student.zero_grad(set_to_none=True)
        student.train()
        self.student = student
        self.temperature = self.params.temperature or default_temperature(head)

    def forward(self, batch: CompatBatch) -> TermOutput:
        d_o = self.teacher.weight.shape[1]
        f = batch.new_feats[:, :d_o]
        o = old_features(batch, self.name, f)
        t = self.temperature
        with torch.no_grad():
            p = torch.softmax(self.teacher.logits(o) / t, dim=1)
        log_q = torch.log_softmax(self.student.logits(f) / t, dim=1)
        raw = F.kl_div(log_q, p, reduction="batchmean")
        return TermOutput(self.params.weight * raw, {"lwf": float(raw.detach())})
