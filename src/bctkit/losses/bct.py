"""``bct``: the BCT influence loss (Shen et al. 2020; methods.md item 3).

    L = L_base(w_n, phi_n; D_n) + weight * L(w_o, phi_n; D_bct)

The trainer computes L_base; this term is the influence loss: the FROZEN old classifier w_o, in the
old head's own form (its type, scale s and margin m: the logits come from the old head class
itself), applied to the first d_o coordinates of the new features. What happens to samples of classes
the old classifier never saw is the ``new_classes`` option:

- ``"ignore"``: D_bct = samples whose class the old classifier knows (``ctx.new_to_old[y] >= 0``);
  the loss is the mean over those samples, 0 (with the graph kept) when a batch has none.
- ``"synthesize"`` (BCT-sys, the paper's way): for every new class unknown to the old classifier a
  row is synthesized as the mean of the L2-normalised old features of that class's training images
  (computed once in :meth:`BCT.setup` from ``ctx.old_train_feats``); these rows are appended after
  the real old rows, which are kept bit for bit, so every sample has a target. For a softmax old
  head a synthesized row gets the MEAN of the real rows' biases: the bias is a log-prior, and the
  average known class's prior is the neutral choice (a zero bias would favour or penalise all new
  classes at once by the real biases' mean). Note that the synthesized rows have norm <= 1 whereas
  real softmax rows have whatever norm training gave them; margin heads normalise rows, so this
  only matters for softmax.
- ``"synthesize_all"`` (the public re-implementations' way): every row is synthesized from the old
  features' class means over the new classes and the targets are the new labels. The form is the
  old head's (softmax rows get bias 0); without an old head (``ctx.old_head is None``, the only
  case where this method works without one) the form is NormFace with s = 64.

``kd=True`` (BCT-kd) replaces the cross entropy by distillation on the same samples and rows:
CE(softmax(z(o) / T), softmax(z(f) / T)) = -sum_j p_j log q_j, averaged over samples, where z(x) are
the classifier's logits WITHOUT margin: W x + b for softmax, s * cos(x, w_j) for cosine heads (the
head's ``logits(x)`` without labels), o the cached old feature and f the new one (first d_o dims).
No T^2 factor is applied. ``temperature=None`` means T = s of a cosine old head (as BCT does) and
T = 1 for softmax.

The classifier rows are non-persistent buffers: never trainable, never in a checkpoint (they are
rebuilt by ``setup``). When d_n > d_o the compatible embedding is f[:d_o]; d_n < d_o is a ConfigError.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from bctkit.errors import ConfigError, DataError
from bctkit.losses.base import CompatBatch, CompatContext, CompatibilityTerm, TermOutput, TermParams, register
from bctkit.losses.unibct.prototypes import class_means
from bctkit.models.heads import CosineHead, Head, NormFaceHead, SoftmaxHead

SYNTH_SCALE = 64.0  # s of the NormFace form used when there is no old head to copy the form from


def frozen_classifier(
    template: Head, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> Head:
    """A copy of ``template`` (same class, s, m) whose parameters are detached, non-persistent
    buffers, optionally with other rows ``weight`` / ``bias``: usable through ``logits`` but
    invisible to optimisers and checkpoints."""
    head = copy.deepcopy(template)
    for name, p in list(head.named_parameters(recurse=False)):
        delattr(head, name)
        head.register_buffer(name, p.detach().clone(), persistent=False)
    if weight is not None:
        head.register_buffer("weight", weight.detach().clone().float(), persistent=False)
    if bias is not None:
        head.register_buffer("bias", bias.detach().clone().float(), persistent=False)
    return head


def default_temperature(head: Head) -> float:
    """T = s for cosine heads (BCT), 1 for softmax."""
    return float(head.s) if isinstance(head, CosineHead) else 1.0


def old_features(batch: CompatBatch, method: str, like: torch.Tensor) -> torch.Tensor:
    """The batch's cached old features as ``like``'s dtype/device; ConfigError when missing."""
    if batch.old_feats is None:
        raise ConfigError(f"{method}: needs cached old features of the training images (batch.old_feats)")
    return torch.as_tensor(batch.old_feats).to(device=like.device, dtype=like.dtype)


class BCTParams(TermParams):
    weight: float = Field(1.0, ge=0)
    new_classes: Literal["ignore", "synthesize", "synthesize_all"] = "synthesize"
    kd: bool = False
    temperature: float | None = Field(None, gt=0)


@register
class BCT(CompatibilityTerm):
    """Influence loss through the frozen (possibly extended or synthesized) old classifier."""

    name = "bct"
    Params = BCTParams
    needs_old_features = True
    aligns_leading_dims = True
    params: BCTParams
    classifier: Head
    target_map: torch.Tensor
    known_class: torch.Tensor

    def uses_old_classifier(self) -> bool:
        return self.params.new_classes != "synthesize_all"

    def setup(self, ctx: CompatContext) -> None:
        """Build the classifier (real, extended or synthesized rows) and the new-label -> row map."""
        super().setup(ctx)
        mode, head, d_o = self.params.new_classes, ctx.old_head, ctx.old_embedding_dim
        new_to_old = ctx.new_to_old.detach().long().cpu()
        if new_to_old.ndim != 1 or len(new_to_old) != ctx.num_new_classes:
            raise DataError(
                f"bct: ctx.new_to_old has shape {tuple(new_to_old.shape)}; expected "
                f"({ctx.num_new_classes},), one old label (or -1) per new class"
            )
        if head is None and mode != "synthesize_all":
            raise ConfigError(
                f"bct: new_classes={mode!r} needs the old classifier (ctx.old_head is None); "
                "use new_classes='synthesize_all'"
            )
        if head is not None:
            if head.weight.ndim != 2 or head.weight.shape[1] != d_o:
                raise DataError(
                    f"bct: old classifier weight has shape {tuple(head.weight.shape)}; expected "
                    f"(num_old_classes, {d_o})"
                )
            c_o = head.num_classes
            if len(new_to_old) and (int(new_to_old.min()) < -1 or int(new_to_old.max()) >= c_o):
                raise DataError(
                    f"bct: ctx.new_to_old has values in [{int(new_to_old.min())}, {int(new_to_old.max())}]; "
                    f"expected -1 or an old class id in [0, {c_o})"
                )

        if mode == "synthesize_all":
            rows = self._class_means(ctx)
            template = head if head is not None else NormFaceHead(d_o, 1, SYNTH_SCALE, 0.0)
            bias = torch.zeros(len(rows)) if isinstance(template, SoftmaxHead) else None
            self.classifier = frozen_classifier(template, rows, bias)
            target_map = torch.arange(ctx.num_new_classes)
        else:
            assert head is not None
            target_map = new_to_old.clone()
            unknown = (new_to_old < 0).nonzero().squeeze(1)
            if mode == "synthesize" and unknown.numel():
                synth = self._class_means(ctx)[unknown].to(head.weight.device)
                rows = torch.cat([head.weight.detach().float(), synth])
                bias = None
                if isinstance(head, SoftmaxHead):
                    real_bias = head.bias.detach().float()
                    bias = torch.cat([real_bias, real_bias.mean().expand(len(unknown))])
                self.classifier = frozen_classifier(head, rows, bias)
                target_map[unknown] = head.num_classes + torch.arange(len(unknown))
            else:
                self.classifier = frozen_classifier(head)
        self.register_buffer("target_map", target_map, persistent=False)
        self.register_buffer("known_class", new_to_old >= 0, persistent=False)
        self.temperature = self.params.temperature or default_temperature(self.classifier)

    def _class_means(self, ctx: CompatContext) -> torch.Tensor:
        """Mean of the normalised old features per new class (zero rows for empty classes)."""
        feats = ctx.old_train_feats
        if feats is None:
            raise ConfigError(
                f"bct: new_classes={self.params.new_classes!r} needs ctx.old_train_feats "
                "(cached old features of the training images)"
            )
        if tuple(feats.shape) != (len(ctx.train_labels), ctx.old_embedding_dim):
            raise DataError(
                f"bct: ctx.old_train_feats has shape {tuple(feats.shape)}; expected "
                f"({len(ctx.train_labels)}, {ctx.old_embedding_dim}), one old feature per training image"
            )
        return class_means(feats, ctx.train_labels, ctx.num_new_classes, allow_empty=True).cpu()

    def forward(self, batch: CompatBatch) -> TermOutput:
        d_o = self.classifier.weight.shape[1]
        f = batch.new_feats[:, :d_o]
        targets = self.target_map[batch.labels]
        keep = targets >= 0
        n_keep = int(keep.sum())
        # The mean is over the kept samples of the whole (global) batch: a rank's share of it is its
        # kept samples' sum over that count, scaled so that the mean over ranks is the batch's loss.
        whole_labels = batch.labels if batch.global_index is None else \
            self.ctx.train_labels[batch.global_index.cpu()].to(batch.labels.device)
        whole_keep = int((self.target_map[whole_labels] >= 0).sum())
        known_frac = float(self.known_class[whole_labels].float().mean())
        scale = (n_keep / whole_keep) / batch.share if whole_keep else 0.0
        o = old_features(batch, self.name, f) if self.params.kd else None
        if n_keep < len(targets):
            f, targets = f[keep], targets[keep]
            o = None if o is None else o[keep]
        if n_keep == 0:
            raw = batch.new_feats.sum() * 0.0
        elif o is not None:
            t = self.temperature
            with torch.no_grad():
                p = torch.softmax(self.classifier.logits(o) / t, dim=1)
            raw = -(p * torch.log_softmax(self.classifier.logits(f) / t, dim=1)).sum(1).mean() * scale
        else:
            raw = F.cross_entropy(self.classifier.logits(f, targets), targets) * scale
        parts = {"influence": float(raw.detach()), "known_frac": known_frac}
        return TermOutput(self.params.weight * raw, parts)
