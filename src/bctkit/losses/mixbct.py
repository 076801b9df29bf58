"""``mixbct``: MixBCT as its official code does it (methods.md item 6).

MixBCT is ONE loss, the run's ArcFace head, trained on a mixed batch. Each step, ``round(mix_ratio * B)``
batch positions whose cached old feature is *credible* get their new feature replaced by the
L2-normalised cached old feature of the same image. The backbone gets gradient only from the kept
rows; the shared classifier learns from both, which pulls new features into the region the old
features of each class occupy (the "adaptive constraint"). No radius is computed anywhere.

Choices that the paper and code leave open, fixed here:

- rounding: the number mixed is ``floor(mix_ratio * B + 0.5)`` (round half up, so 0.5 * 5 -> 3);
  when fewer positions of the batch are credible, all credible ones are replaced.
- randomness: the positions are drawn with a ``torch.Generator`` seeded from ``(seed, step)``, so a
  run is reproducible and a resumed run draws what the uninterrupted one drew (the official code
  uses an unseeded RNG).
- dimensions: the classifier has ``d_n`` inputs, old features ``d_o``. ``d_n == d_o`` is the
  official setting. ``d_n > d_o`` needs ``dim_rule: pad``: old features are zero-padded to ``d_n``,
  which ties the first ``d_o`` coordinates of the new embedding to the old space, so cross tests
  compare ``f[:d_o]`` with the old features (:meth:`MixBCT.compatible_dims`). ``d_n < d_o`` is refused.
- old features from a softmax-trained (unnormalised) old model are fine: both the denoise rule and
  the mixed rows use L2-normalised old features.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from bctkit.errors import ConfigError, DataError
from bctkit.losses.base import CompatBatch, CompatContext, CompatibilityTerm, TermOutput, TermParams, register

__all__ = ["MixBCT", "MixBCTParams", "credible_mask", "mix_count", "step_generator"]

_EPS = 1e-12  # as F.normalize: a zero row (or an all-zero dimension) stays zero
_CHUNK_BYTES = 1 << 21  # float64 working set per row chunk (2 MiB: stays in cache)
_KEEP_TOL = 1e-9  # keep * n_c within this of an integer counts as that integer (0.7 * 10 -> 7)


def _chunk_rows(d: int) -> int:
    """Rows per float64 working chunk of ``d``-dimensional features."""
    return max(1, _CHUNK_BYTES // (8 * max(d, 1)))


def credible_mask(old_feats: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                  keep: float = 0.9) -> torch.Tensor:
    """MixBCT's denoise rule: which old features are credible enough to be mixed in.

    Old features are L2-normalised per row, then each dimension is divided by its L2 norm over all
    samples. Per class (size n_c), the ``ceil(keep * n_c)`` samples closest (Euclidean) to the class
    mean of these features are credible; a class with one image keeps it. Distances are computed in
    float64 and compared after rounding to float32, so samples equally far up to rounding error
    (e.g. the two samples of a 2-image class) are ties; ties go to the lower row index. Features are
    never modified.

    Fully vectorised: class sums by ``scatter_add_``, one sort by (label, distance, row) and a rank
    within each class; two passes over the rows in float64 chunks, so memory-mapped float16 caches of
    millions of rows work (the input is never modified or copied whole). Returns a CPU bool tensor
    with one entry per row.
    """
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"credible_mask: keep={keep} must lie in (0, 1]")
    x = torch.as_tensor(old_feats)
    y = torch.as_tensor(labels)
    if x.ndim != 2 or x.dtype == torch.bool or x.is_complex():
        raise DataError(f"old features have shape {tuple(x.shape)} and dtype {x.dtype}; "
                        "expected a real 2-D (rows, dims) matrix")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"labels have shape {tuple(y.shape)}; expected ({x.shape[0]},), "
                        "one label per old feature row")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise DataError(f"labels have dtype {y.dtype}; expected integers")
    n, d = x.shape
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    x, y = x.cpu(), y.cpu().to(torch.int64)
    _, inv = torch.unique(y, return_inverse=True)
    counts = torch.bincount(inv)
    num_classes = len(counts)

    # pass 1: unit rows u (a NaN/Inf anywhere in a row makes its norm non-finite), their per-dimension
    # squared norms and per-class sums. Dividing each dimension by its norm is linear, so the class
    # mean of the scaled features is the class mean of u scaled the same way.
    step = _chunk_rows(d)
    inv_row = torch.empty(n, dtype=torch.float64)
    col_sq = torch.zeros(d, dtype=torch.float64)
    sums = torch.zeros(num_classes, d, dtype=torch.float64)
    for s in range(0, n, step):
        u = x[s : s + step].to(torch.float64, copy=True)
        norms = torch.linalg.vector_norm(u, dim=1)
        finite = torch.isfinite(norms)
        if not finite.all():
            bad = s + int((~finite).nonzero()[0])
            raise DataError(f"old feature row {bad} contains NaN or Inf; recompute the old features")
        inv_row[s : s + step] = 1.0 / norms.clamp_min(_EPS)
        u.mul_(inv_row[s : s + step, None])
        col_sq += torch.linalg.vector_norm(u, dim=0).square_()
        sums.scatter_add_(0, inv[s : s + step, None].expand(-1, d), u)
    inv_col = 1.0 / col_sq.sqrt().clamp_min(_EPS)
    means = sums.div_(counts[:, None])

    # pass 2: distance of each scaled row to its class mean, ||(u_i - mean_c) / col_norm||
    dist = torch.empty(n, dtype=torch.float64)
    for s in range(0, n, step):
        u = x[s : s + step].to(torch.float64, copy=True).mul_(inv_row[s : s + step, None])
        dist[s : s + step] = torch.linalg.vector_norm(u.sub_(means[inv[s : s + step]]).mul_(inv_col), dim=1)

    order = torch.argsort(dist.to(torch.float32), stable=True)
    order = order[torch.argsort(inv[order], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    kept_per_class = torch.ceil(keep * counts.to(torch.float64) - _KEEP_TOL).to(torch.int64).clamp_min(1)
    cls = inv[order]
    rank = torch.arange(n) - starts[cls]
    mask = torch.empty(n, dtype=torch.bool)
    mask[order] = rank < kept_per_class[cls]
    return mask


def mix_count(mix_ratio: float, batch_size: int, eligible: int) -> int:
    """Rows replaced in a batch: ``floor(mix_ratio * B + 0.5)`` (round half up), at most ``eligible``."""
    return min(int(math.floor(mix_ratio * batch_size + 0.5)), eligible)


def step_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for one optimisation step, a function of (seed, step) only (resume-safe)."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


class MixBCTParams(TermParams):
    mix_ratio: float = Field(0.3, ge=0, le=1)
    denoise: bool = True
    keep: float = Field(0.9, gt=0, le=1)
    seed: int = Field(666, ge=0)
    dim_rule: Literal["refuse", "pad"] = "refuse"


@register
class MixBCT(CompatibilityTerm):
    """Replace a random share of credible rows by their normalised old features (see module doc)."""

    name = "mixbct"
    Params = MixBCTParams
    needs_old_features = True
    params: MixBCTParams

    def __init__(self, params: MixBCTParams) -> None:
        super().__init__(params)
        self.credible = torch.zeros(0, dtype=torch.bool)
        self._last: tuple[int, int, int] | None = None  # (step, rows replaced, batch size): global batch
        self._whole = (0, 0)

    def check_dims(self, old_dim: int, new_dim: int) -> None:
        if new_dim == old_dim:
            return
        if new_dim < old_dim:
            raise ConfigError(
                f"mixbct: new embedding_dim {new_dim} < old embedding_dim {old_dim}; old features are fed "
                "through the new classifier, so the new model needs at least the old model's dimensions"
            )
        if self.params.dim_rule == "refuse":
            raise ConfigError(
                f"mixbct: new embedding_dim {new_dim} != old embedding_dim {old_dim}; the new classifier "
                "is trained on old features too. Either give the new backbone embedding_dim "
                f"{old_dim} (the official setting), or set params.dim_rule: pad to zero-pad old features "
                f"to {new_dim} (cross tests then compare the first {old_dim} coordinates)"
            )

    def compatible_dims(self, old_dim: int, new_dim: int) -> int | None:
        return old_dim if self.params.dim_rule == "pad" and new_dim > old_dim else None

    def setup(self, ctx: CompatContext) -> None:
        """Compute the credible mask once (all True with ``denoise: false``)."""
        super().setup(ctx)
        self.check_dims(ctx.old_embedding_dim, ctx.new_embedding_dim)
        old = ctx.old_train_feats
        if old is None:
            raise ValueError("mixbct needs cached old features")
        if old.ndim != 2 or old.shape[1] != ctx.old_embedding_dim:
            raise DataError(f"mixbct: cached old features have shape {tuple(old.shape)}; expected "
                            f"(rows, {ctx.old_embedding_dim})")
        if self.params.denoise:
            self.credible = credible_mask(old, ctx.train_labels, self.params.keep)
        else:
            if len(ctx.train_labels) != old.shape[0]:
                raise DataError(f"mixbct: {len(ctx.train_labels)} training labels for {old.shape[0]} "
                                "cached old feature rows")
            self.credible = torch.ones(old.shape[0], dtype=torch.bool)

    def normalised_old(self, old: torch.Tensor, new_dim: int) -> torch.Tensor:
        """L2-normalised old features, zero-padded to ``new_dim`` columns when ``dim_rule`` is pad."""
        o = F.normalize(old.float(), dim=1)
        return F.pad(o, (0, new_dim - o.shape[1])) if new_dim > o.shape[1] else o

    def mixed_positions(self, batch: CompatBatch) -> torch.Tensor:
        """Bool mask over this rank's rows: the rows replaced at this step. The draw is made over the
        step's whole (global) batch, so the rows mixed do not depend on the number of processes."""
        whole = batch.whole_index.cpu()
        eligible = self.credible[whole].nonzero().flatten()
        k = mix_count(self.params.mix_ratio, len(whole), len(eligible))
        gen = step_generator(self.params.seed, batch.step)
        pick = eligible[torch.randperm(len(eligible), generator=gen)[:k]]
        mask = torch.zeros(len(whole), dtype=torch.bool)
        mask[pick] = True
        self._whole = (int(mask.sum()), len(whole))
        return mask[batch.offset : batch.offset + len(batch.index)]

    def mix(self, feats: torch.Tensor, batch: CompatBatch) -> torch.Tensor:
        """``feats`` with the chosen rows replaced by normalised old features (no gradient there)."""
        old = batch.old_feats
        if old is None:
            raise ValueError("mixbct needs cached old features")
        if old.shape[0] != feats.shape[0] or len(batch.index) != feats.shape[0]:
            raise DataError(f"mixbct: batch has {feats.shape[0]} new features, {old.shape[0]} old "
                            f"features and {len(batch.index)} indices")
        self.check_dims(old.shape[1], feats.shape[1])
        mask = self.mixed_positions(batch)
        k = int(mask.sum())
        self._last = (batch.step, *self._whole)
        if k == 0:
            return feats
        picked = old[mask.to(old.device)]
        if not torch.isfinite(picked).all():
            row = int(batch.index[mask][~torch.isfinite(picked).all(dim=1).cpu()][0])
            raise DataError(f"mixbct: the cached old feature of training image {row} contains NaN or Inf")
        o = self.normalised_old(old.to(feats.device), feats.shape[1]).to(feats.dtype)
        return torch.where(mask.to(feats.device)[:, None], o, feats)

    def forward(self, batch: CompatBatch) -> TermOutput:
        """No extra loss (MixBCT is the base ArcFace on the mixed batch); logs the rows replaced."""
        if self._last is None or self._last[0] != batch.step:
            raise RuntimeError("mixbct: forward() called for a step whose batch was not mixed")
        _, k, b = self._last
        return TermOutput(batch.new_feats.new_zeros(()), {"mixed": float(k), "mix_frac": k / b})
