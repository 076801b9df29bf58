"""``unibct``: UniBCT (methods.md item 5). L = ArcFace(w_n, phi_n) + eta * ArcFace(w_hat_o, phi_n),
with frozen pseudo prototypes w_hat_o built from the cached old features of the new training set:
``avg`` (class means), ``drop`` (means after dropping the farthest 10 %) or ``refined`` (structural
refinement along the graph of current new-model similarities, Eq. 6 row-stochastic as written).

eta = 0 during the first ``warmup_epochs``; prototypes are (re)built at the end of warm-up and every
``rebuild_every`` epochs after it (or at ``rebuild_epochs``), the refined ones with the current new
model. The base ArcFace is the run's new head; this term adds the prototype ArcFace. With refined
prototypes the training history logs what the last rebuild's weights did (``proto_ess``, ``proto_low``:
:func:`bctkit.losses.unibct.refinement.weight_summary`; after a resume, from the next rebuild on).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bctkit.errors import ConfigError
from bctkit.features import extract
from bctkit.losses.base import CompatBatch, CompatContext, CompatibilityTerm, TermOutput, TermParams, register
from bctkit.losses.unibct.prototypes import class_means, drop_means
from bctkit.losses.unibct.refinement import refinement_weights, weight_summary, weighted_means
from bctkit.models.heads import ArcFaceHead


class UniBCTParams(TermParams):
    prototypes: Literal["avg", "drop", "refined"] = "refined"
    eta: float = Field(1.0, ge=0)
    warmup_epochs: int = Field(10, ge=0)
    rebuild_every: int = Field(10, ge=1)
    rebuild_epochs: list[int] | None = None
    s: float = Field(64.0, gt=0)
    m: float = Field(0.5, ge=0)
    drop: float = Field(0.1, ge=0, lt=1)
    lam: float = Field(0.9, ge=0, lt=1)
    tau: float = Field(0.05, gt=0)
    normalize: Literal["row", "column"] = "row"


@register
class UniBCT(CompatibilityTerm):
    """ArcFace on frozen pseudo old prototypes, after a warm-up."""

    name = "unibct"
    Params = UniBCTParams
    needs_old_features = True
    aligns_leading_dims = True
    params: UniBCTParams


    def check_train(self, epochs: int) -> None:
        p = self.params
        if p.warmup_epochs >= epochs:
            raise ConfigError(f"unibct: warmup_epochs={p.warmup_epochs} leaves no epoch of the {epochs}")
        if p.rebuild_epochs is not None and any(e < p.warmup_epochs or e >= epochs for e in p.rebuild_epochs):
            raise ConfigError(
                f"unibct: rebuild_epochs {p.rebuild_epochs} must lie in [warmup_epochs, epochs) = "
                f"[{p.warmup_epochs}, {epochs})"
            )


    def rebuild_at(self, epoch: int) -> bool:
        """Whether prototypes are (re)built at the start of 0-based ``epoch``."""
        p = self.params
        if p.rebuild_epochs is not None:
            return epoch in p.rebuild_epochs or (epoch == p.warmup_epochs and not p.rebuild_epochs)
        return epoch >= p.warmup_epochs and (epoch - p.warmup_epochs) % p.rebuild_every == 0

    def setup(self, ctx: CompatContext) -> None:
        super().setup(ctx)
        if ctx.old_train_feats is None:
            raise ValueError("unibct needs cached old features")
        self.head = ArcFaceHead(ctx.old_embedding_dim, ctx.num_new_classes, self.params.s, self.params.m)
        self.head.requires_grad_(False)
        self.register_buffer("built", torch.zeros((), dtype=torch.bool))
        self.weight_stats: dict[str, float] = {}

    def build(self, model: nn.Module) -> torch.Tensor:
        """Pseudo prototypes (num_new_classes x d_o) for the current state of ``model``."""
        ctx, p = self.ctx, self.params
        old, labels, c = ctx.old_train_feats, ctx.train_labels, ctx.num_new_classes
        if p.prototypes == "avg":
            return class_means(old, labels, c)
        if p.prototypes == "drop":
            return drop_means(old, labels, c, drop=p.drop)
        if ctx.train_images is None:
            raise ValueError("unibct refined prototypes need the training images")
        new = extract(model, ctx.train_images, progress=False, desc="unibct new features")
        weights = refinement_weights(new[:, : ctx.old_embedding_dim], labels, c, lam=p.lam, tau=p.tau,
                                     normalize=p.normalize)
        self.weight_stats = weight_summary(weights, labels, c)
        return weighted_means(old, weights, labels, c)

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        if not self.rebuild_at(epoch):
            return
        if self.built and self.params.prototypes != "refined":
            return
        with torch.no_grad():
            self.head.weight.copy_(self.build(model))
        self.built.fill_(True)

    def forward(self, batch: CompatBatch) -> TermOutput:
        if batch.epoch < self.params.warmup_epochs or not self.built:
            return TermOutput(batch.new_feats.new_zeros(()), {"eta": 0.0})
        f = batch.new_feats[:, : self.ctx.old_embedding_dim]
        loss = F.cross_entropy(self.head.logits(f, batch.labels), batch.labels)
        parts = {"proto_ce": float(loss.detach()), "eta": self.params.eta}
        parts.update({f"proto_{k}": v for k, v in self.weight_stats.items()})
        return TermOutput(self.params.eta * loss, parts)
