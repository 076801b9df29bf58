"""Checks shared by UniBCT's prototype builders: feature matrices, labels, class counts and
hyper-parameters. Bad input raises ``DataError``; bad hyper-parameters raise ``ConfigError``."""

from __future__ import annotations

import math

import numpy as np
import torch

from bctkit.errors import ConfigError, DataError

Features = torch.Tensor | np.ndarray
Labels = torch.Tensor | np.ndarray

_MAX_LISTED_IDS = 10
_NUMPY_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64"})


def check_features(name: str, x: object) -> tuple[int, int]:
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


def device_of(*xs: object) -> torch.device:
    """Compute device: that of the first torch input, CPU for numpy inputs."""
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def labels_tensor(labels: Labels, n_rows: int, num_classes: int) -> torch.Tensor:
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


def class_counts(y: torch.Tensor, num_classes: int, allow_empty: bool) -> torch.Tensor:
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


def check_hyper(name: str, value: float, lo: float, hi: float, hi_open: bool) -> float:
    """Range-check a float hyper-parameter: lo <= value < hi (or <= hi)."""
    v = float(value)
    ok = lo <= v < hi if hi_open else lo <= v <= hi
    if not ok or math.isnan(v):
        bracket = ")" if hi_open else "]"
        raise ConfigError(f"{name} is {value}; expected a value in [{lo}, {hi}{bracket}")
    return v


def check_norms(
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
