"""1:1 verification metrics (evaluation.md, "1:1 verification: TAR@FAR")."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from bctkit.errors import DataError


def tar_at_far(
    scores: np.ndarray, labels: np.ndarray, fars: Sequence[float], mode: str = "exact"
) -> dict[float, float]:
    """TAR at each FAR. Exact rule: threshold t = smallest score with #(impostor > t) <= floor(f N_imp)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise DataError(f"scores ({scores.shape[0]}) and labels ({labels.shape[0]}) differ in length")
    if not np.isfinite(scores).all():
        raise DataError("scores contain NaN or Inf")
    if mode != "exact":
        raise DataError(f"unknown tar_at_far mode {mode!r}; expected 'exact'")
    gen = scores[labels == 1]
    imp = scores[labels == 0]
    if gen.size == 0 or imp.size == 0:
        raise DataError("tar_at_far needs at least one genuine and one impostor score")
    out: dict[float, float] = {}
    for far in fars:
        k = math.floor(far * imp.size)
        if k < 1:
            warnings.warn(f"FAR {far:g} not measurable with {imp.size} impostors", stacklevel=2)
            out[far] = math.nan
            continue
        t = -np.inf if k >= imp.size else np.partition(imp, imp.size - 1 - k)[imp.size - 1 - k]
        out[far] = float((gen > t).mean())
    return out
