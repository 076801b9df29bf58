"""Pseudo prototypes for UniBCT: frozen class rows built from old features of the new training set.

Two builders here (methods.md item 5); the third, the structural refinement, is
:mod:`bctkit.losses.unibct.refinement`:

- ``class_means``: vanilla average of (normalised) old features per class (BCT's synthesised
  classifier rows and BT^2's pseudo classifier use it too).
- ``drop_means``: per class, drop the samples farthest from the class mean, then average.

Both accept torch tensors or numpy arrays, including ``np.memmap`` files (float16 is fine): rows are
read in blocks (:mod:`bctkit.storage.rows`) and converted to the compute dtype there, so a features
file as large as MS1Mv3 never has to be decoded into memory as a whole. Bad input raises
``DataError``; bad hyper-parameters raise ``ConfigError``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bctkit.losses.unibct.inputs import (
    Features,
    Labels,
    check_features,
    check_hyper,
    class_counts,
    device_of,
    labels_tensor,
)
from bctkit.storage.rows import row_blocks

__all__ = ["class_means", "drop_means"]


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
    n, d = check_features("feats", feats)
    y = labels_tensor(labels, n, num_classes)
    counts = class_counts(y, num_classes, allow_empty)
    device = device_of(feats)
    y_dev = y.to(device)
    sums = torch.zeros(num_classes, d, dtype=dtype, device=device)
    for start, block in row_blocks("feats", feats, max(1, int(block_rows)), dtype, device):
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
    drop = check_hyper("drop", drop, 0.0, 1.0, hi_open=True)
    means = class_means(
        feats, labels, num_classes, normalize,
        allow_empty=allow_empty, dtype=dtype, block_rows=block_rows,
    )
    n, d = int(feats.shape[0]), int(feats.shape[1])
    y = labels_tensor(labels, n, num_classes)
    counts = torch.bincount(y, minlength=num_classes)
    device = means.device
    y_dev = y.to(device)
    block_rows = max(1, int(block_rows))

    dist = torch.empty(n, dtype=dtype, device=device)
    for start, block in row_blocks("feats", feats, block_rows, dtype, device):
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
    for start, block in row_blocks("feats", feats, block_rows, dtype, device):
        if normalize:
            block = F.normalize(block, dim=1)
        stop = start + block.shape[0]
        kept = keep[start:stop]
        sums.index_add_(0, y_dev[start:stop][kept], block[kept])
    kept_counts = torch.minimum(keep_n, counts).clamp_min(1)
    return sums / kept_counts.to(device=device, dtype=dtype).unsqueeze(1)
