"""UniBCT's structural refinement of the pseudo prototypes: Eqs. 6-10 with the ROW-stochastic edge
matrix of Eq. 6 (the published pseudo-code normalises columns, which makes the refinement a no-op;
that behaviour is kept behind ``normalize="column"`` for comparison only).

:func:`refinement_weights` gives each training sample a weight from the new model's similarity graph
of its class; :func:`weighted_means` applies weights to the normalised old features;
:func:`refine_prototypes` is both; :func:`weight_summary` condenses weights for training logs. Inputs
may be torch tensors or numpy arrays, ``np.memmap`` files (float16) larger than RAM included: rows
are read per chunk of classes or per block (:mod:`bctkit.storage.rows`). Bad input raises
``DataError``; bad hyper-parameters raise ``ConfigError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from bctkit.errors import ConfigError, DataError
from bctkit.losses.unibct.chunks import plan_batches
from bctkit.losses.unibct.chunks import plan_chunks as _plan_chunks  # noqa: F401 (tests use it)
from bctkit.losses.unibct.inputs import (
    Features,
    Labels,
    check_features,
    check_hyper,
    check_norms,
    class_counts,
    device_of,
    labels_tensor,
)
from bctkit.storage.rows import RowReader, prefetch_groups

__all__ = ["refine_prototypes", "refinement_weights", "weight_summary", "weighted_means"]

_EPS = 1e-12  # as F.normalize: a zero row stays zero
_CHUNK_ROWS = 4096  # default chunk_size: classes are padded per chunk of this many rows


def _solve_systems(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched exact solve of a x = b (LU with partial pivoting), one intra-op thread on CPU.

    With torch 2.13 CPU and more than one thread, the batched LU runs MKL's threaded getrf inside
    torch's own parallel loop; for matrices of ~150 rows and up this returned wrong solutions or
    invalid pivots (seen here with 2 threads: errors up to 2e-3, or "Pivots given to lu_solve must
    all be greater or equal to 1"), and it was slower. The systems are small, so solving them on
    one thread costs little. The thread count is restored afterwards; torch ops run meanwhile from
    other Python threads would see one thread.
    """
    threads = torch.get_num_threads()
    if a.device.type != "cpu" or threads == 1:
        return torch.linalg.solve(a, b)
    torch.set_num_threads(1)
    try:
        return torch.linalg.solve(a, b)
    finally:
        torch.set_num_threads(threads)


def _propagation_weights(
    new: torch.Tensor,
    valid: torch.Tensor | None,
    counts: torch.Tensor,
    lam: float,
    tau: float,
    normalize: Literal["row", "column"],
    row_ids: torch.Tensor,
) -> torch.Tensor:
    """Weights w (B, m) with prototype = w^T V0, for a padded batch of classes.

    ``new`` (B, m, d_n) holds raw new features; cosines come from the Gram matrix scaled by the
    inverse norms (its diagonal), so the features are never normalised in place. With the edge
    matrix E of Eq. 6 (softmax of S = cos / tau over each row, or column, with the diagonal and
    padding excluded), mean_rows((1 - lam) (I - lam E)^-1 V0) = w^T V0 where
    (I - lam E)^T w = (1 - lam) / m * 1: one right-hand side per class, no inverse, no (m x d)
    solve. ``valid`` (B, m) marks real slots, None when no slot is padding. Padding rows/cols of E
    are zero and their right-hand side is zero, so their w is zero. All (B, m, m) work is done in
    place on the Gram matrix: scale, mask, softmax, then I - lam E^T as a transposed view.
    """
    b, m, d = new.shape
    gram = torch.bmm(new, new.transpose(1, 2))
    sq_norms = gram.diagonal(dim1=1, dim2=2)
    check_norms("new_feats", new.view(b * m, d), sq_norms.reshape(-1), row_ids, overflow=True)
    inv = sq_norms.sqrt().clamp_min(_EPS).reciprocal()
    sim = gram.mul_(inv.unsqueeze(2) / tau).mul_(inv.unsqueeze(1))
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    dim = -1 if normalize == "row" else -2
    singleton = (counts == 1).to(new.device)
    if valid is not None:  # padding is excluded along the softmax; its other side is zeroed after
        sim.masked_fill_(~valid.unsqueeze(-2 if dim == -1 else -1), float("-inf"))
    e = torch.softmax(sim, dim=dim)
    del gram, sim
    if valid is not None or bool(singleton.any()):  # padding and singletons (0/0) become zeros
        ok = (valid if valid is not None else torch.ones(b, m, dtype=torch.bool, device=new.device))
        ok = ok & ~singleton.unsqueeze(1)
        e.masked_fill_(~ok.unsqueeze(-1 if dim == -1 else -2), 0.0)
    system = e.mul_(-lam).transpose(1, 2)
    system.diagonal(dim1=1, dim2=2).add_(1.0)
    cnt = counts.to(device=new.device, dtype=new.dtype)
    rhs = ((1.0 - lam) / cnt).unsqueeze(1).expand(b, m)
    if valid is not None:
        rhs = valid.to(new.dtype) * rhs
    w = _solve_systems(system, rhs.unsqueeze(2).contiguous()).squeeze(2)
    ones = torch.ones_like(w) if valid is None else valid.to(new.dtype)
    return torch.where(singleton.unsqueeze(1), ones, w)


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size is {chunk_size!r}; expected a positive integer")


def _check_refine_options(lam: float, tau: float, normalize: str, chunk_size: int) -> tuple[float, float]:
    if normalize not in ("row", "column"):
        raise ConfigError(f"normalize is {normalize!r}; expected 'row' or 'column'")
    lam = check_hyper("lam", lam, 0.0, 1.0, hi_open=True)
    tau = float(tau)
    if not tau > 0 or math.isinf(tau):
        raise ConfigError(f"tau is {tau}; expected a finite positive temperature")
    _check_chunk_size(chunk_size)
    return lam, tau


@torch.no_grad()
def refinement_weights(
    new_feats: Features,
    labels: Labels,
    num_classes: int,
    lam: float = 0.9,
    tau: float = 0.05,
    normalize: Literal["row", "column"] = "row",
    chunk_size: int = _CHUNK_ROWS,
    *,
    allow_empty: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-sample weights w (n,) of the structural refinement: the refined prototype of class c is
    sum_{i in c} w_i n(v0_i) (see :func:`refine_prototypes`).

    Each class's weights are non-negative and sum to one (the plain mean gives every sample 1/m);
    ``m * w_i`` below one means the new-model graph places sample i outside the dense part of its
    class, so the lowest-weighted samples are the candidates for wrong labels. Singletons get 1.

    Samples are sorted by class once; classes of similar size are processed together in chunks of
    at most ``chunk_size`` padded rows: batched Gram matrix, masked softmax and one batched solve
    with one right-hand side per class (no inverse, no (m x d) solve). ``new_feats`` may be a float16
    ``np.memmap``: only the current chunk's rows are read.
    """
    n, _ = check_features("new_feats", new_feats)
    lam, tau = _check_refine_options(lam, tau, normalize, chunk_size)
    y = labels_tensor(labels, n, num_classes)
    counts = class_counts(y, num_classes, allow_empty)
    return _weights_pass(new_feats, y, counts, num_classes, lam, tau, normalize, chunk_size, dtype,
                         device_of(new_feats))


def _class_chunks(
    readers: list[RowReader], y: torch.Tensor, counts: torch.Tensor, num_classes: int,
    plan: list[tuple[torch.Tensor, int]],
) -> Iterator[tuple[torch.Tensor, int, torch.Tensor | None, torch.Tensor, list[torch.Tensor]]]:
    """Yield (class ids, padded size m, valid (B, m) or None, source rows (B*m,), rows per reader
    as (B, m, d) views) for each chunk of :func:`_plan_chunks`, classes sorted by size.

    Rows are gathered per chunk; padding slots repeat the class's first sample (callers mask them).
    Memmap inputs are read ahead, in file order, for runs of chunks (:func:`prefetch_groups`).
    """
    order = torch.argsort(y, stable=True)
    first_of_class = torch.cumsum(counts, 0) - counts
    chunk_rows = [int(counts[cls].sum()) for cls, _ in plan]
    groups = [prefetch_groups(r.x, chunk_rows) for r in readers]
    for i, (cls, m) in enumerate(plan):
        for reader, group in zip(readers, groups, strict=True):
            if i in group:
                in_group = torch.zeros(num_classes, dtype=torch.bool)
                in_group[torch.cat([c for c, _ in plan[i : group[i]]])] = True
                reader.prefetch(in_group[y].nonzero().squeeze(1))
        b, cnt = cls.numel(), counts[cls]
        slots = torch.arange(m).unsqueeze(0)
        padded = bool((cnt < m).any())
        valid = slots < cnt.unsqueeze(1) if padded else None
        starts = first_of_class[cls].unsqueeze(1)
        src = order[(starts + (slots * valid if valid is not None else slots)).flatten()]
        rows = [r.take(src).view(b, m, -1) for r in readers]
        yield cls, m, valid, src, rows


def _max_rows(plan: list[tuple[torch.Tensor, int]]) -> int:
    return max((cls.numel() * m for cls, m in plan), default=0)


def _weights_pass(
    new_feats: Features, y: torch.Tensor, counts: torch.Tensor, num_classes: int,
    lam: float, tau: float, normalize: Literal["row", "column"], chunk_size: int, dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Pass 1 of the refinement, by class chunks over the new features (inputs already checked)."""
    weights = torch.zeros(len(y), dtype=dtype, device=device)
    plan = plan_batches(counts, chunk_size)
    reader = RowReader(new_feats, _max_rows(plan), dtype, device)
    for cls, _, valid, src, (new,) in _class_chunks([reader], y, counts, num_classes, plan):
        valid_dev = None if valid is None else valid.to(device)
        w = _propagation_weights(new, valid_dev, counts[cls], lam, tau, normalize, src)
        if valid is None:
            weights[src.to(device)] = w.flatten()
        else:
            flat_valid = valid.flatten()
            weights[src[flat_valid].to(device)] = w.flatten()[flat_valid.to(device)]
    return weights


def _fused_pass(
    old_feats: Features, new_feats: Features, y: torch.Tensor, counts: torch.Tensor,
    num_classes: int, d_old: int, normalize_inputs: bool, lam: float, tau: float,
    normalize: Literal["row", "column"], chunk_size: int, dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    """Both passes in one sweep over class chunks: the chunk's weights w (B, m) from its new rows,
    then prototypes = w / |v0| times its gathered old rows, one batched (1 x m) @ (m x d_o) product
    per chunk (no scatter-add). Padding slots have zero weight."""
    plan = plan_batches(counts, chunk_size)
    readers = [RowReader(x, _max_rows(plan), dtype, device) for x in (new_feats, old_feats)]
    out = torch.zeros(num_classes, d_old, dtype=dtype, device=device)
    for cls, _, valid, src, (new, old) in _class_chunks(readers, y, counts, num_classes, plan):
        valid_dev = None if valid is None else valid.to(device)
        coef = _propagation_weights(new, valid_dev, counts[cls], lam, tau, normalize, src)
        norms = torch.linalg.vector_norm(old, dim=2)
        check_norms("old_feats", old.view(-1, d_old), norms.view(-1), src, normalize_inputs)
        if normalize_inputs:
            coef = coef.div_(norms.clamp_min_(_EPS))
        out[cls.to(device)] = torch.bmm(coef.unsqueeze(1), old).squeeze(1)
    return out


@torch.no_grad()
def refine_prototypes(
    old_feats: Features,
    new_feats: Features,
    labels: Labels,
    num_classes: int,
    lam: float = 0.9,
    tau: float = 0.05,
    normalize: Literal["row", "column"] = "row",
    chunk_size: int = _CHUNK_ROWS,
    normalize_inputs: bool = True,
    *,
    allow_empty: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """UniBCT structural refinement (Eqs. 6-10): refined pseudo prototypes, (num_classes, d_o).

    Per class with m samples: V0 = old features (L2-normalised when ``normalize_inputs``),
    S_ij = <n(f_i), n(f_j)> / tau over the new features f, diagonal excluded;
    E = row softmax of S (E_ii = 0, rows sum to one); V_inf = (1 - lam) (I - lam E)^-1 V0;
    prototype = mean of the rows of V_inf, a convex combination of V0 that leans towards samples
    that many others are similar to. A class with one sample keeps its (normalised) old feature.
    ``normalize="column"`` reproduces the published pseudo-code (column softmax), whose result is
    exactly ``class_means``: for comparison only. The prototype is not re-normalised.

    One sweep over chunks of classes of similar size (as :func:`refinement_weights`): per chunk the
    new and old rows are gathered together, the weights w come from the new rows (prototype =
    sum_i w_i n(v0_i)) and the prototypes are one batched (1 x m) @ (m x d_o) product with the old
    rows, so there is no per-class Python loop and no scatter-add. An ``np.memmap`` of old features
    is instead read once, sequentially, after the weights, and summed per class (``index_add_``):
    gathering it would need a second read-ahead buffer and re-read its pages. Only the current
    chunk's or block's rows are read and converted to ``dtype`` (memmaps: read ahead in file order
    for runs of chunks), so the inputs may be float16 ``np.memmap`` files larger than RAM; rows are
    checked for NaN/Inf as they are read. Memory is O(rows_max * (d_n + d_o + m_max) + n) with
    rows_max = max(chunk_size, largest class), plus the memmap read-ahead (bounded by
    ``storage.rows``); the O(n) part is the labels, their sort order and a few index vectors.
    ``allow_empty=True`` gives classes without samples a zero row instead of a DataError.
    """
    n, d_old = check_features("old_feats", old_feats)
    n_new, _ = check_features("new_feats", new_feats)
    if n_new != n:
        raise DataError(f"new_feats has {n_new} rows; expected {n}, one per row of old_feats")
    lam, tau = _check_refine_options(lam, tau, normalize, chunk_size)
    y = labels_tensor(labels, n, num_classes)
    counts = class_counts(y, num_classes, allow_empty)
    device = device_of(old_feats, new_feats)
    if isinstance(old_feats, np.memmap):  # read sequentially, once: no second read-ahead buffer
        weights = _weights_pass(new_feats, y, counts, num_classes, lam, tau, normalize, chunk_size,
                                dtype, device)
        return _weighted_pass(old_feats, weights, y, num_classes, d_old, normalize_inputs, chunk_size,
                              dtype, device)
    return _fused_pass(old_feats, new_feats, y, counts, num_classes, d_old, normalize_inputs, lam, tau,
                       normalize, chunk_size, dtype, device)


def _weighted_pass(
    old_feats: Features, weights: torch.Tensor, y: torch.Tensor, num_classes: int, d_old: int,
    normalize_inputs: bool, chunk_size: int, dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    """Pass 2: sequential blocks of the old features, (normalised and) weighted, summed per class."""
    n = len(y)
    y_dev = y.to(device)
    weights = weights.to(device=device, dtype=dtype)
    block_rows = max(chunk_size, 8192)
    old_reader = RowReader(old_feats, min(n, block_rows), dtype, device)
    out = torch.zeros(num_classes, d_old, dtype=dtype, device=device)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        block = old_reader.take_range(start, stop)
        norms = torch.linalg.vector_norm(block, dim=1)
        check_norms("old_feats", block, norms, torch.arange(start, stop), normalize_inputs)
        coef = weights[start:stop]
        if normalize_inputs:
            coef = coef / norms.clamp_min(_EPS)
        out.index_add_(0, y_dev[start:stop], block.mul_(coef.unsqueeze(1)))
    return out


@torch.no_grad()
def weighted_means(
    old_feats: Features,
    weights: torch.Tensor | np.ndarray,
    labels: Labels,
    num_classes: int,
    normalize_inputs: bool = True,
    chunk_size: int = _CHUNK_ROWS,
    *,
    allow_empty: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-class sums of ``weights[i] * n(old_feats[i])`` (num_classes, d_o): with the output of
    :func:`refinement_weights` these are the refined prototypes, so one set of weights can be both
    inspected and used. Reads ``old_feats`` (np.memmap fine) once, sequentially, in blocks."""
    n, d_old = check_features("old_feats", old_feats)
    w = torch.as_tensor(weights)
    if w.shape != (n,) or not w.dtype.is_floating_point:
        raise DataError(f"weights have shape {tuple(w.shape)} and dtype {w.dtype}; expected ({n},) floats, "
                        "one per row of old_feats")
    if not torch.isfinite(w).all():
        raise DataError("weights contain NaN or Inf")
    _check_chunk_size(chunk_size)
    y = labels_tensor(labels, n, num_classes)
    class_counts(y, num_classes, allow_empty)
    device = device_of(old_feats, w)
    return _weighted_pass(old_feats, w, y, num_classes, d_old, normalize_inputs, chunk_size, dtype, device)


@torch.no_grad()
def weight_summary(
    weights: torch.Tensor, labels: Labels, num_classes: int, low: float = 0.5
) -> dict[str, float]:
    """What a set of refinement weights did, for training logs: ``ess`` = mean over classes of more
    than one sample of the effective sample share 1 / (m * sum w_i^2) (1: the plain mean), and
    ``low`` = share of samples (of such classes) weighted below ``low`` times the plain mean's 1/m,
    the samples the new model's graph places outside their class (candidates for wrong labels)."""
    w = torch.as_tensor(weights).double().cpu()
    y = labels_tensor(labels, len(w), num_classes).cpu()
    counts = torch.bincount(y, minlength=num_classes)
    sq = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, w * w)
    multi = counts > 1
    if not multi.any():
        return {"ess": 1.0, "low": 0.0}
    ess = (1.0 / (counts[multi] * sq[multi])).mean()
    in_multi = multi[y]
    scaled = w[in_multi] * counts[y][in_multi]
    return {"ess": float(ess), "low": float((scaled < low).double().mean())}
