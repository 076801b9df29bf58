"""``bt2``: BT^2, backward-compatible training with a basis transformation (Zhou et al. 2023;
methods.md item 7).

The method trains :class:`bctkit.models.bt2.BT2Net` (the run's new backbone, widened: the stored
embedding z has d_o + k dims, z[:d_o] = bct is compatible with the old model). The trainer's base
head classifies f, the model's own d-dim feature (CE(W f, y)); this term adds

    influence_weight * CE(scale * n(bct) P^T, y)      P: per-class means of normalised old features
  + old_weight       * (1 - cos(bct, phi_o(x)))       phi_o(x): cached old feature of the image
  + paragon_weight   * (1 - cos(f, phi'_n(x)))        phi'_n(x): cached feature of the paragon

with the paper's weights 10, 5 and 1. ``scale`` = 1 is the official code (cosine logits without a
scale). The paragon is the independently trained new model of the same run (stage two of BT^2's
three stages); both targets come from the feature cache, never from a forward pass per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from bctkit.errors import ConfigError, DataError
from bctkit.losses.base import CompatBatch, CompatContext, CompatibilityTerm, TermOutput, TermParams, register
from bctkit.losses.bct import old_features
from bctkit.losses.unibct.prototypes import class_means
from bctkit.models.config import BackboneConfig, BT2Layout


class BT2Params(TermParams):
    k: int = Field(32, ge=1, description="dimensions added to the old model's")
    C: float = Field(2.0, gt=0, description="weight of f in z: <z, z'> = <a, a'> + C^2 <f, f'>")
    influence_weight: float = Field(10.0, ge=0)
    old_weight: float = Field(5.0, ge=0)
    paragon_weight: float = Field(1.0, ge=0)
    scale: float = Field(1.0, gt=0, description="multiplies the pseudo-classifier logits")


@register
class BT2(CompatibilityTerm):
    """BT^2's three compatibility targets on the widened model's bct block and f."""

    name = "bt2"
    Params = BT2Params
    needs_old_features = True
    needs_paragon_features = True
    params: BT2Params
    pseudo: torch.Tensor

    def check_dims(self, old_dim: int, new_dim: int) -> None:
        if old_dim + self.params.k <= new_dim:
            raise ConfigError(
                f"bt2: old embedding_dim {old_dim} + k {self.params.k} must exceed the new embedding_dim "
                f"{new_dim} (z keeps all of f plus at least one added coordinate)"
            )

    def compatible_dims(self, old_dim: int, new_dim: int) -> int | None:
        return old_dim

    def backbone_config(self, cfg: BackboneConfig, old_dim: int) -> BackboneConfig:
        return cfg.model_copy(update={"bt2": BT2Layout(old_dim=old_dim, k=self.params.k, C=self.params.C)})

    def setup(self, ctx: CompatContext) -> None:
        """The pseudo classifier P from the cached old features of the training images."""
        super().setup(ctx)
        if ctx.old_train_feats is None or ctx.paragon_train_feats is None:
            raise ConfigError("bt2: needs cached old and paragon features of the training images")
        for name, t in (("old", ctx.old_train_feats), ("paragon", ctx.paragon_train_feats)):
            if len(t) != len(ctx.train_labels):
                raise DataError(
                    f"bt2: {name} features have {len(t)} rows for {len(ctx.train_labels)} training images"
                )
        if ctx.paragon_train_feats.shape[1] != ctx.new_embedding_dim:
            raise DataError(
                f"bt2: paragon features have {ctx.paragon_train_feats.shape[1]} dims; f has "
                f"{ctx.new_embedding_dim}"
            )
        pseudo = class_means(ctx.old_train_feats, ctx.train_labels, ctx.num_new_classes)
        self.register_buffer("pseudo", pseudo, persistent=False)

    def forward(self, batch: CompatBatch) -> TermOutput:
        p = self.params
        z, f = batch.new_feats, batch.base_feats
        if f is None or batch.paragon_feats is None:
            raise ConfigError("bt2: the batch needs base_feats (f) and paragon_feats")
        d_o = self.pseudo.shape[1]
        bct = z[:, :d_o]
        old = old_features(batch, self.name, z)
        par = torch.as_tensor(batch.paragon_feats).to(device=f.device, dtype=f.dtype)
        logits = p.scale * F.normalize(bct, dim=1) @ self.pseudo.T
        influence = F.cross_entropy(logits, batch.labels)
        old_cos = 1 - F.cosine_similarity(bct, old, dim=1).mean()
        par_cos = 1 - F.cosine_similarity(f, par, dim=1).mean()
        loss = p.influence_weight * influence + p.old_weight * old_cos + p.paragon_weight * par_cos
        return TermOutput(loss, {"influence": float(influence.detach()), "old_cos": float(old_cos.detach()),
                                 "paragon_cos": float(par_cos.detach())})
