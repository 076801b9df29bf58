"""Pseudo prototypes for UniBCT: frozen class rows built from old features of the new training set.

Three builders (methods.md item 5):

- ``class_means``: vanilla average of (normalised) old features per class.
- ``drop_means``: per class, drop the samples farthest from the class mean, then average.
- ``refine_prototypes``: structural refinement, UniBCT Eqs. 6-10 with the ROW-stochastic edge matrix
  of Eq. 6 (the published pseudo-code normalises columns, which makes the refinement a no-op; that
  behaviour is kept behind ``normalize="column"`` for comparison only).

All builders accept torch tensors or numpy arrays, including ``np.memmap`` files (float16 is fine):
rows are read in blocks or per chunk of classes and converted to the compute dtype there, so a
features file as large as MS1Mv3 never has to be decoded into memory as a whole. Bad input raises
``DataError``; bad hyper-parameters raise ``ConfigError``.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from bctkit.errors import ConfigError, DataError

Features = torch.Tensor | np.ndarray
Labels = torch.Tensor | np.ndarray

__all__ = [
    "class_means", "drop_means", "refine_prototypes", "refinement_weights", "weight_summary",
    "weighted_means",
]

_MAX_LISTED_IDS = 10
_NUMPY_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64"})
_MAPPED_BUDGET_BYTES = 1 << 30  # file-backed RSS that triggers unmapping memmap pages
_STAGING_BYTES = 512 << 20  # memmap rows read ahead, in file order, for a group of chunks
_EPS = 1e-12  # as F.normalize: a zero row stays zero


# ----------------------------------------------------------------------------- input validation


def _check_features(name: str, x: object) -> tuple[int, int]:
    """Check that ``x`` is a 2-D real tensor/array and return its (rows, dims)."""
    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise DataError(f"{name} has dtype {x.dtype}; expected real-valued features")
    elif isinstance(x, np.ndarray):
        if x.dtype.name not in _NUMPY_DTYPES or not x.dtype.isnative:
            raise DataError(
                f"{name} has dtype {x.dtype}; expected native-endian "
                f"{', '.join(sorted(_NUMPY_DTYPES))} features"
            )
    else:
        raise DataError(f"{name} is a {type(x).__name__}; expected a torch.Tensor or numpy array")
    if x.ndim != 2:
        raise DataError(f"{name} has shape {tuple(x.shape)}; expected a 2-D (rows, dims) matrix")
    return int(x.shape[0]), int(x.shape[1])


def _device_of(*xs: object) -> torch.device:
    """Compute device: that of the first torch input, CPU for numpy inputs."""
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def _labels_tensor(labels: Labels, n_rows: int, num_classes: int) -> torch.Tensor:
    """Validate labels against the feature rows and the class count; return them as CPU int64."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise DataError(f"num_classes is {num_classes!r}; expected a positive integer")
    if num_classes < 1:
        raise DataError(f"num_classes is {num_classes}; expected a positive integer")
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if y.ndim != 1 or y.shape[0] != n_rows:
        raise DataError(
            f"labels has shape {tuple(y.shape)}; expected ({n_rows},), one label per feature row"
        )
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(f"labels has dtype {y.dtype}; expected integer class ids")
    y = y.detach().to(device="cpu", dtype=torch.int64)
    if n_rows:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"labels has values in [{lo}, {hi}]; expected class ids in [0, {num_classes})"
            )
    return y


def _class_counts(y: torch.Tensor, num_classes: int, allow_empty: bool) -> torch.Tensor:
    """Samples per class; classes without samples are bad input unless ``allow_empty``."""
    counts = torch.bincount(y, minlength=num_classes)
    if not allow_empty:
        empty = (counts == 0).nonzero().squeeze(1)
        if empty.numel():
            ids = empty[:_MAX_LISTED_IDS].tolist()
            more = f" and {empty.numel() - len(ids)} more" if empty.numel() > len(ids) else ""
            raise DataError(
                f"labels leave classes {ids}{more} without samples; expected every class in "
                f"[0, {num_classes}) to have one (allow_empty=True gives them zero rows)"
            )
    return counts


def _check_finite(name: str, block: torch.Tensor, row_ids: torch.Tensor | int) -> None:
    """Raise DataError naming the first non-finite row; ``row_ids`` maps block rows to input rows
    (a tensor of ids, or the input row of the block's first row)."""
    bad_rows = ~torch.isfinite(block).all(dim=1)
    if bool(bad_rows.any()):
        first = int(bad_rows.nonzero()[0, 0])
        row = row_ids + first if isinstance(row_ids, int) else int(row_ids[first])
        raise DataError(f"{name} row {row} contains NaN or Inf; expected finite features")


def _check_hyper(name: str, value: float, lo: float, hi: float, hi_open: bool) -> float:
    """Range-check a float hyper-parameter: lo <= value < hi (or <= hi)."""
    v = float(value)
    ok = lo <= v < hi if hi_open else lo <= v <= hi
    if not ok or math.isnan(v):
        bracket = ")" if hi_open else "]"
        raise ConfigError(f"{name} is {value}; expected a value in [{lo}, {hi}{bracket}")
    return v


# ----------------------------------------------------------------------------- row access


def _resident_file_bytes() -> float:
    """File-backed resident memory of this process (Linux /proc/self/statm); inf if unknown."""
    try:
        with open("/proc/self/statm") as fh:
            shared_pages = int(fh.read().split()[2])
        return float(shared_pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return math.inf


def _release_mapped_pages(x: object) -> None:
    """Unmap the pages of a read-only or shared ``np.memmap`` once reading has mapped too many.

    Rows read through a file mapping stay counted in the process RSS until unmapped, so reading a
    whole 10 GiB memmap would show a 10 GiB RSS. When the file-backed resident memory passes
    ``_MAPPED_BUDGET_BYTES`` the mapping's pages are dropped (MADV_DONTNEED); the data stays in the
    OS page cache, so a re-read costs a minor fault. Releasing only past a budget, not after every
    chunk, avoids most of those faults. Copy-on-write maps (mode "c") are left alone, since
    MADV_DONTNEED would discard their private changes.
    """
    mapping = getattr(x, "_mmap", None)
    if not isinstance(x, np.memmap) or getattr(x, "mode", "c") == "c":
        return
    if not isinstance(mapping, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    if _resident_file_bytes() < _MAPPED_BUDGET_BYTES:
        return
    try:
        mapping.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        return


class _RowReader:
    """Gathers rows of one input into a buffer reused across chunks, converted to ``dtype``.

    numpy inputs (memmaps included) are gathered in their own dtype into a staging array and then
    converted, so only the requested rows are ever decoded; reusing the buffers avoids paying for
    fresh pages on every chunk.
    """

    def __init__(
        self, x: Features, max_rows: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.x = x
        d = int(x.shape[1])
        self.out = torch.empty(max_rows, d, dtype=dtype, device=device)
        self.stage: np.ndarray | torch.Tensor | None = None
        self.cache: np.ndarray | None = None
        self.cached_rows: np.ndarray | None = None
        if isinstance(x, np.ndarray):
            self.stage = np.empty((max_rows, d), dtype=x.dtype)
        elif x.dtype != dtype or x.device != device:
            self.stage = torch.empty(max_rows, d, dtype=x.dtype, device=x.device)

    def prefetch(self, rows: torch.Tensor) -> None:
        """Read ``rows`` of a memmap, in file order, into memory for the next ``take`` calls.

        Rows of a chunk of classes are scattered over the file; reading the rows of many chunks
        at once in ascending order lets one page fault serve many rows, where reading each chunk
        on its own cost one fault per row (most of the run time for a float16 MS1Mv3 memmap).
        """
        if not isinstance(self.x, np.memmap):
            return
        self.cache = None
        self.cached_rows = np.sort(rows.numpy())
        self.cache = np.empty((self.cached_rows.size, self.x.shape[1]), dtype=self.x.dtype)
        # read window by window of the file, so mapped pages can be released in between
        window = max(1, _MAPPED_BUDGET_BYTES // 4 // max(1, self.x.shape[1] * self.x.itemsize))
        edges = np.searchsorted(self.cached_rows, np.arange(0, self.x.shape[0] + window, window))
        for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
            if hi > lo:
                np.take(self.x, self.cached_rows[lo:hi], axis=0, out=self.cache[lo:hi], mode="clip")
                _release_mapped_pages(self.x)

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (CPU int64 ids, any order, repeats allowed) as a (k, d) view."""
        k = rows.numel()
        out = self.out[:k]
        if isinstance(self.x, np.ndarray):
            stage = self.stage[:k]
            if self.cache is not None:
                at = np.searchsorted(self.cached_rows, rows.numpy())
                np.take(self.cache, at, axis=0, out=stage, mode="clip")
            else:
                np.take(self.x, rows.numpy(), axis=0, out=stage, mode="clip")
                _release_mapped_pages(self.x)
            out.copy_(torch.from_numpy(stage))
        elif self.stage is None:
            torch.index_select(self.x.detach(), 0, rows.to(self.x.device), out=out)
        else:
            stage = self.stage[:k]
            torch.index_select(self.x.detach(), 0, rows.to(self.x.device), out=stage)
            out.copy_(stage)
        return out

    def take_range(self, start: int, stop: int) -> torch.Tensor:
        """Contiguous rows start:stop as a (k, d) view of the reader's own buffer."""
        out = self.out[: stop - start]
        if isinstance(self.x, np.ndarray):
            stage = self.stage[: stop - start]
            stage[...] = self.x[start:stop]
            _release_mapped_pages(self.x)
            out.copy_(torch.from_numpy(stage))
        else:
            out.copy_(self.x.detach()[start:stop])
        return out


def _check_norms(
    name: str, rows: torch.Tensor, norms: torch.Tensor, row_ids: torch.Tensor, overflow: bool
) -> None:
    """Raise DataError for the first row whose norm is not finite (NaN/Inf inside, or overflow).

    ``rows`` (k, d) and ``norms`` (k,) are a chunk and its row norms (or squared norms); a
    non-finite norm of finite values is an error only when ``overflow`` (the norm is needed).
    """
    bad = (~torch.isfinite(norms)).nonzero().squeeze(1)
    if bad.numel() == 0:
        return
    nonfinite = ~torch.isfinite(rows[bad]).all(dim=1)
    if bool(nonfinite.any()):
        row = int(row_ids[bad[nonfinite][0]])
        raise DataError(f"{name} row {row} contains NaN or Inf; expected finite features")
    if overflow:
        raise DataError(
            f"{name} row {int(row_ids[bad[0]])} has a norm that overflows {rows.dtype}; expected "
            "features of moderate magnitude (or pass dtype=torch.float64)"
        )


def _row_blocks(
    name: str, x: Features, block_rows: int, dtype: torch.dtype, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first row, finite-checked block converted to ``dtype``) over contiguous row blocks."""
    n = int(x.shape[0])
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        if isinstance(x, torch.Tensor):
            block = x.detach()[start:stop].to(device=device, dtype=dtype)
        else:
            block = torch.from_numpy(np.array(x[start:stop])).to(device, dtype)
            _release_mapped_pages(x)
        _check_finite(name, block, start)
        yield start, block


# ----------------------------------------------------------------------------- means


@torch.no_grad()
def class_means(
    feats: Features,
    labels: Labels,
    num_classes: int,
    normalize: bool = True,
    *,
    allow_empty: bool = False,
    dtype: torch.dtype = torch.float32,
    block_rows: int = 65536,
) -> torch.Tensor:
    """Per-class mean of the features, (num_classes, d): UniBCT's "vanilla avg" prototypes.

    With ``normalize`` every row is L2-normalised before averaging (the mean itself is not
    re-normalised; margin heads normalise their weights). A class without samples is a DataError
    unless ``allow_empty``, in which case its row is zero. Rows are read in contiguous blocks of
    ``block_rows`` (so memmaps are decoded one block at a time) and summed with ``index_add_``.
    """
    n, d = _check_features("feats", feats)
    y = _labels_tensor(labels, n, num_classes)
    counts = _class_counts(y, num_classes, allow_empty)
    device = _device_of(feats)
    y_dev = y.to(device)
    sums = torch.zeros(num_classes, d, dtype=dtype, device=device)
    for start, block in _row_blocks("feats", feats, max(1, int(block_rows)), dtype, device):
        if normalize:
            block = F.normalize(block, dim=1)
        sums.index_add_(0, y_dev[start : start + block.shape[0]], block)
    return sums / counts.clamp_min(1).to(device=device, dtype=dtype).unsqueeze(1)


@torch.no_grad()
def drop_means(
    feats: Features,
    labels: Labels,
    num_classes: int,
    drop: float = 0.1,
    normalize: bool = True,
    *,
    allow_empty: bool = False,
    dtype: torch.dtype = torch.float32,
    block_rows: int = 65536,
) -> torch.Tensor:
    """Per-class mean after dropping outliers: UniBCT's "drop avg" prototypes, (num_classes, d).

    A class with n_c samples keeps the ceil((1 - drop) * n_c) samples (at least one) closest, in
    Euclidean distance, to its mean, i.e. it drops floor(drop * n_c) of them; distances and the
    final mean use the L2-normalised rows when ``normalize``. Ties are broken by row order. Three
    streamed passes over the rows (mean, distances, kept mean); no per-class Python loop.
    """
    drop = _check_hyper("drop", drop, 0.0, 1.0, hi_open=True)
    means = class_means(
        feats, labels, num_classes, normalize,
        allow_empty=allow_empty, dtype=dtype, block_rows=block_rows,
    )
    n, d = int(feats.shape[0]), int(feats.shape[1])
    y = _labels_tensor(labels, n, num_classes)
    counts = torch.bincount(y, minlength=num_classes)
    device = means.device
    y_dev = y.to(device)
    block_rows = max(1, int(block_rows))

    dist = torch.empty(n, dtype=dtype, device=device)
    for start, block in _row_blocks("feats", feats, block_rows, dtype, device):
        if normalize:
            block = F.normalize(block, dim=1)
        stop = start + block.shape[0]
        dist[start:stop] = (block - means[y_dev[start:stop]]).norm(dim=1)

    by_dist = torch.argsort(dist.cpu(), stable=True)
    order = by_dist[torch.argsort(y[by_dist], stable=True)]
    first_of_class = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n) - first_of_class[y[order]]
    keep_n = torch.ceil((1.0 - drop) * counts.double() - 1e-9).long().clamp_min(1)
    keep = (rank < keep_n[y]).to(device)

    sums = torch.zeros(num_classes, d, dtype=dtype, device=device)
    for start, block in _row_blocks("feats", feats, block_rows, dtype, device):
        if normalize:
            block = F.normalize(block, dim=1)
        stop = start + block.shape[0]
        kept = keep[start:stop]
        sums.index_add_(0, y_dev[start:stop][kept], block[kept])
    kept_counts = torch.minimum(keep_n, counts).clamp_min(1)
    return sums / kept_counts.to(device=device, dtype=dtype).unsqueeze(1)


# ----------------------------------------------------------------------------- refinement


def _plan_chunks(counts: torch.Tensor, chunk_size: int) -> list[tuple[torch.Tensor, int]]:
    """Group classes of similar size into chunks of at most ``chunk_size`` padded rows.

    Classes are sorted by size; a chunk holds consecutive classes and is padded to its largest
    class. A chunk is closed early when adding the next size would leave it less than 3/4 real
    rows, so padding wastes little work. A class larger than ``chunk_size`` gets a chunk alone.
    Returns (class ids, padded size) per chunk. Loops over distinct sizes, not over classes.
    """
    present = (counts > 0).nonzero().squeeze(1)
    if present.numel() == 0:
        return []
    sizes = counts[present]
    by_size = torch.argsort(sizes, stable=True)
    cls_sorted, sizes_sorted = present[by_size], sizes[by_size]
    uniq, group_len = torch.unique_consecutive(sizes_sorted, return_counts=True)

    bounds: list[tuple[int, int, int]] = []
    begin, cur, cur_real, last_m = 0, 0, 0, 0
    for m, k in zip(uniq.tolist(), group_len.tolist(), strict=True):
        cap = max(1, chunk_size // m)
        if cur and cur < cap:
            take = min(k, cap - cur)
            if cur_real + take * m < 0.75 * (cur + take) * m:
                bounds.append((begin, begin + cur, last_m))
                begin, cur, cur_real = begin + cur, 0, 0
        while k > 0:
            if cur >= cap:
                bounds.append((begin, begin + cur, last_m))
                begin, cur, cur_real = begin + cur, 0, 0
            take = min(k, cap - cur)
            cur, cur_real, k, last_m = cur + take, cur_real + take * m, k - take, m
    if cur:
        bounds.append((begin, begin + cur, last_m))
    return [(cls_sorted[b:e], m) for b, e, m in bounds]


def _prefetch_groups(
    plan: list[tuple[torch.Tensor, int]], counts: torch.Tensor, group_rows: int
) -> dict[int, int]:
    """Split the chunk plan into runs of consecutive chunks holding about ``group_rows`` rows.

    Returns {first chunk index: end chunk index} for each run; a run has at least one chunk.
    """
    groups: dict[int, int] = {}
    start, rows = 0, 0
    for i, (cls, _) in enumerate(plan):
        chunk_rows = int(counts[cls].sum())
        if i > start and rows + chunk_rows > group_rows:
            groups[start] = i
            start, rows = i, 0
        rows += chunk_rows
    if plan:
        groups[start] = len(plan)
    return groups


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
    valid: torch.Tensor,
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
    solve. Padding rows/cols of E are zero and their right-hand side is zero, so their w is zero.
    """
    b, m, d = new.shape
    gram = torch.bmm(new, new.transpose(1, 2))
    sq_norms = gram.diagonal(dim1=1, dim2=2)
    _check_norms("new_feats", new.view(b * m, d), sq_norms.reshape(-1), row_ids, overflow=True)
    inv = sq_norms.sqrt().clamp_min(_EPS).reciprocal()
    sim = gram.mul_(inv.unsqueeze(2) / tau).mul_(inv.unsqueeze(1))
    eye = torch.eye(m, dtype=torch.bool, device=new.device)
    edges = valid.unsqueeze(2) & valid.unsqueeze(1) & ~eye
    sim.masked_fill_(~edges, float("-inf"))
    e = torch.softmax(sim, dim=-1 if normalize == "row" else -2).masked_fill_(~edges, 0.0)
    system = torch.eye(m, dtype=new.dtype, device=new.device) - lam * e.transpose(1, 2)
    cnt = counts.to(device=new.device, dtype=new.dtype)
    rhs = valid.to(new.dtype) * ((1.0 - lam) / cnt).unsqueeze(1)
    w = _solve_systems(system, rhs.unsqueeze(2)).squeeze(2)
    singleton = (counts == 1).to(new.device).unsqueeze(1)
    return torch.where(singleton, valid.to(new.dtype), w)


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size is {chunk_size!r}; expected a positive integer")


def _check_refine_options(lam: float, tau: float, normalize: str, chunk_size: int) -> tuple[float, float]:
    if normalize not in ("row", "column"):
        raise ConfigError(f"normalize is {normalize!r}; expected 'row' or 'column'")
    lam = _check_hyper("lam", lam, 0.0, 1.0, hi_open=True)
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
    chunk_size: int = 4096,
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
    n, d_new = _check_features("new_feats", new_feats)
    lam, tau = _check_refine_options(lam, tau, normalize, chunk_size)
    y = _labels_tensor(labels, n, num_classes)
    counts = _class_counts(y, num_classes, allow_empty)
    return _weights_pass(new_feats, y, counts, num_classes, d_new, lam, tau, normalize, chunk_size, dtype,
                         _device_of(new_feats))


def _weights_pass(
    new_feats: Features, y: torch.Tensor, counts: torch.Tensor, num_classes: int, d_new: int,
    lam: float, tau: float, normalize: Literal["row", "column"], chunk_size: int, dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Pass 1 of the refinement, by class chunks over the new features (inputs already checked)."""
    n = len(y)
    order = torch.argsort(y, stable=True)
    first_of_class = torch.cumsum(counts, 0) - counts
    plan = _plan_chunks(counts, chunk_size)
    max_rows = max((cls.numel() * m for cls, m in plan), default=0)
    weights = torch.zeros(n, dtype=dtype, device=device)
    new_reader = _RowReader(new_feats, max_rows, dtype, device)
    prefetch_at: dict[int, int] = {}
    if isinstance(new_feats, np.memmap):
        row_bytes = d_new * new_feats.dtype.itemsize
        prefetch_at = _prefetch_groups(plan, counts, max(1, _STAGING_BYTES // max(1, row_bytes)))
    for i, (cls, m) in enumerate(plan):
        if i in prefetch_at:
            in_group = torch.zeros(num_classes, dtype=torch.bool)
            in_group[torch.cat([c for c, _ in plan[i : prefetch_at[i]]])] = True
            new_reader.prefetch(in_group[y].nonzero().squeeze(1))
        b, cnt = cls.numel(), counts[cls]
        slots = torch.arange(m).unsqueeze(0)
        valid = slots < cnt.unsqueeze(1)
        # padding slots repeat the class's first sample: masked out of E and given zero weight
        src = order[(first_of_class[cls].unsqueeze(1) + slots * valid).flatten()]
        new = new_reader.take(src).view(b, m, -1)
        w = _propagation_weights(new, valid.to(device), cnt, lam, tau, normalize, src)
        flat_valid = valid.flatten()
        weights[src[flat_valid].to(device)] = w.flatten()[flat_valid.to(device)]
    return weights


@torch.no_grad()
def refine_prototypes(
    old_feats: Features,
    new_feats: Features,
    labels: Labels,
    num_classes: int,
    lam: float = 0.9,
    tau: float = 0.05,
    normalize: Literal["row", "column"] = "row",
    chunk_size: int = 4096,
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

    Pass 1 is :func:`refinement_weights` (a weight per sample, prototype = sum_i w_i n(v0_i)). The
    old features are then read once, sequentially, in blocks, and accumulated with ``index_add_``
    (they are never gathered). Only the current chunk's or block's rows are read and converted to
    ``dtype``, so the inputs may be float16 ``np.memmap`` files larger than RAM; rows are checked for
    NaN/Inf as they are read. Memory is O(rows_max * (d_n + m_max) + block * d_o + n) with
    rows_max = max(chunk_size, largest class) and block = max(chunk_size, 8192).
    ``allow_empty=True`` gives classes without samples a zero row instead of a DataError.
    """
    n, d_old = _check_features("old_feats", old_feats)
    n_new, d_new = _check_features("new_feats", new_feats)
    if n_new != n:
        raise DataError(f"new_feats has {n_new} rows; expected {n}, one per row of old_feats")
    lam, tau = _check_refine_options(lam, tau, normalize, chunk_size)
    y = _labels_tensor(labels, n, num_classes)
    counts = _class_counts(y, num_classes, allow_empty)
    device = _device_of(old_feats, new_feats)
    weights = _weights_pass(new_feats, y, counts, num_classes, d_new, lam, tau, normalize, chunk_size,
                            dtype, device)

    return _weighted_pass(old_feats, weights, y, num_classes, d_old, normalize_inputs, chunk_size, dtype,
                          device)


def _weighted_pass(
    old_feats: Features, weights: torch.Tensor, y: torch.Tensor, num_classes: int, d_old: int,
    normalize_inputs: bool, chunk_size: int, dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    """Pass 2: sequential blocks of the old features, (normalised and) weighted, summed per class."""
    n = len(y)
    y_dev = y.to(device)
    weights = weights.to(device=device, dtype=dtype)
    block_rows = max(chunk_size, 8192)
    old_reader = _RowReader(old_feats, min(n, block_rows), dtype, device)
    out = torch.zeros(num_classes, d_old, dtype=dtype, device=device)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        block = old_reader.take_range(start, stop)
        norms = torch.linalg.vector_norm(block, dim=1)
        _check_norms("old_feats", block, norms, torch.arange(start, stop), normalize_inputs)
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
    chunk_size: int = 4096,
    *,
    allow_empty: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-class sums of ``weights[i] * n(old_feats[i])`` (num_classes, d_o): with the output of
    :func:`refinement_weights` these are the refined prototypes, so one set of weights can be both
    inspected and used. Reads ``old_feats`` (np.memmap fine) once, sequentially, in blocks."""
    n, d_old = _check_features("old_feats", old_feats)
    w = torch.as_tensor(weights)
    if w.shape != (n,) or not w.dtype.is_floating_point:
        raise DataError(f"weights have shape {tuple(w.shape)} and dtype {w.dtype}; expected ({n},) floats, "
                        "one per row of old_feats")
    if not torch.isfinite(w).all():
        raise DataError("weights contain NaN or Inf")
    _check_chunk_size(chunk_size)
    y = _labels_tensor(labels, n, num_classes)
    _class_counts(y, num_classes, allow_empty)
    device = _device_of(old_feats, w)
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
    y = _labels_tensor(labels, len(w), num_classes).cpu()
    counts = torch.bincount(y, minlength=num_classes)
    sq = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, w * w)
    multi = counts > 1
    if not multi.any():
        return {"ess": 1.0, "low": 0.0}
    ess = (1.0 / (counts[multi] * sq[multi])).mean()
    in_multi = multi[y]
    scaled = w[in_multi] * counts[y][in_multi]
    return {"ess": float(ess), "low": float((scaled < low).double().mean())}
