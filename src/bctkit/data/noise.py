"""Label noise for robustness studies: relabel a seeded share of a training pool's images.

Face training sets such as MS1M carry wrong identity labels even after cleaning, and several
compatibility methods (UniBCT's refined and drop prototypes, MixBCT's denoise rule) exist to cope
with them. The embedded datasets are clean, so this module makes a noisy copy of a pool's labels:
exactly ``round(fraction * N)`` images, drawn without replacement, each get a label drawn uniformly
from the *other* classes (symmetric noise). The allocation then splits the noisy pool as it would a
real one; evaluation identities are never touched.
"""

from __future__ import annotations

import numpy as np

from bctkit.errors import ConfigError, DataError

__all__ = ["flip_labels"]


def flip_labels(labels: np.ndarray, fraction: float, seed: int, num_classes: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, sorted indices of the relabelled images) for int labels in [0, num_classes).

    ``num_classes`` defaults to ``labels.max() + 1``. A relabelled image always gets a different
    class, uniform over the other ``num_classes - 1``. Raises DataError when the noise would leave a
    class without images (the allocation needs every class to keep one).
    """
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"label_noise is {fraction}; expected a fraction in [0, 1)")
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels have shape {y.shape} and dtype {y.dtype}; expected 1-D integers")
    c = int(y.max()) + 1 if num_classes is None and len(y) else int(num_classes or 0)
    if len(y) and (y.min() < 0 or y.max() >= c):
        raise DataError(f"labels lie in [{y.min()}, {y.max()}]; expected [0, {c})")
    k = int(np.floor(fraction * len(y) + 0.5))
    if k == 0:
        return y.astype(np.int64, copy=True), np.zeros(0, dtype=np.int64)
    if c < 2:
        raise DataError(f"label_noise needs at least 2 classes to relabel images; the pool has {c}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6E6F6973]))
    idx = np.sort(rng.choice(len(y), size=k, replace=False))
    noisy = y.astype(np.int64, copy=True)
    noisy[idx] = (y[idx] + rng.integers(1, c, size=k)) % c
    empty = np.flatnonzero((np.bincount(noisy, minlength=c) == 0) & (np.bincount(y, minlength=c) > 0))
    if len(empty):
        raise DataError(f"label_noise {fraction} relabels every image of class {int(empty[0])} "
                        f"({len(empty)} classes left empty); use a smaller fraction or more images per class")
    return noisy, idx
