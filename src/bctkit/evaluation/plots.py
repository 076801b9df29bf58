"""PNG figures for reports (matplotlib, Agg backend), written atomically.

Each writer saves to a temporary file in the destination directory and then os.replace()s it, so a
reader never sees a half-written PNG and an interrupted run leaves no partial file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from bctkit.errors import DataError  # noqa: E402


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temp file in the same directory + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path


Style = Mapping[str, Mapping[str, object]]
"""Per curve label, matplotlib line options (color, linestyle): one colour per model in every figure."""


def _legend_outside(ax: plt.Axes) -> None:
    """The legend right of the axes, where it cannot cover a curve."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0.0)


def model_styles(names: Sequence[str]) -> dict[str, str]:
    """One colour per model name (tab10, in the given order), shared by every figure of a report."""
    cmap = plt.get_cmap("tab10")
    return {name: matplotlib.colors.to_hex(cmap(i % 10)) for i, name in enumerate(names)}


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    title: str = "ROC",
    min_far: float = 1e-7,
    styles: Style | None = None,
) -> Path:
    """ROC curves (TAR in % vs FAR, log-x) of several labelled runs, e.g. cross and self, on one plot.

    Points with FAR below ``min_far`` (including FAR = 0) are not drawn on the log axis.
    """
    if not curves:
        raise DataError("plot_roc needs at least one curve")
    arrays = {}
    for label, (fpr, tpr) in curves.items():
        arrays[label] = (np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64))
        if arrays[label][0].shape != arrays[label][1].shape:
            raise DataError(f"curve {label!r}: fpr and tpr differ in length")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, (fpr, tpr) in arrays.items():
        ok = fpr >= min_far
        ax.plot(fpr[ok], 100 * tpr[ok], label=str(label), **dict((styles or {}).get(label, {})))
    ax.set_xscale("log")
    ax.set_xlim(min_far, 1.0)
    ax.set_ylim(0.0, 101)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("TAR (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    return save_figure(fig, path)


def plot_cmc(
    curves: Mapping[str, Mapping[int, float]],
    path: str | os.PathLike,
    title: str = "CMC",
    styles: Style | None = None,
) -> Path:
    """CMC curves: {label: {rank k: identification rate (fraction)}} plotted in % against k."""
    if not curves:
        raise DataError("plot_cmc needs at least one curve")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, points in curves.items():
        ks = sorted(points)
        ax.plot(ks, [100 * points[k] for k in ks], marker="o", label=str(label),
                **dict((styles or {}).get(label, {})))
    ax.set_xscale("log")
    ax.set_ylim(0.0, 101)
    ax.set_xlabel("rank k")
    ax.set_ylabel("identification rate (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    return save_figure(fig, path)


def plot_backfill(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    title: str = "Partial backfill",
    ylabel: str = "top-1",
    styles: Style | None = None,
) -> Path:
    """Partial backfill curves {label: (fractions, values as fractions)}, drawn in %; the legend
    shows each area in %, with two decimals, as report.md's table gives it."""
    if not curves:
        raise DataError("plot_backfill needs at least one curve")
    arrays = {}
    for label, (fr, vals) in curves.items():
        arrays[label] = (np.asarray(fr, dtype=np.float64), np.asarray(vals, dtype=np.float64))
        if arrays[label][0].shape != arrays[label][1].shape:
            raise DataError(f"curve {label!r}: fractions and values differ in length")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, (fr, vals) in arrays.items():
        area = float(np.trapezoid(vals, fr)) if fr.size > 1 else float("nan")
        ax.plot(100 * fr, 100 * vals, marker="o", label=f"{label} (area {100 * area:.2f} %)",
                **dict((styles or {}).get(label, {})))
    ax.set_xlim(0.0, 100.0)
    ax.set_xlabel("gallery backfilled (%)")
    ax.set_ylabel(f"{ylabel} (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    return save_figure(fig, path)


def plot_matrix(
    m: np.ndarray,
    names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
    fmt: str = "{:.4f}",
) -> Path:
    """Heat map of a compatibility matrix (rows: query model, columns: gallery model), annotated."""
    m = np.asarray(m, dtype=np.float64)
    names = [str(n) for n in names]
    if m.ndim != 2 or m.shape != (len(names), len(names)):
        raise DataError(f"matrix shape {m.shape} does not match {len(names)} names")
    size = max(4.0, 0.9 * len(names) + 2.0)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    finite = m[np.isfinite(m)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    mid = (vmin + vmax) / 2.0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            v = m[i, j]
            text = "n/a" if not np.isfinite(v) else fmt.format(v)
            color = "black" if np.isfinite(v) and v > mid else "white"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("gallery model")
    ax.set_ylabel("query model")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_summary(
    values: Mapping[str, Mapping[str, tuple[float | None, float | None]]],
    old_self: Mapping[str, float | None],
    path: str | os.PathLike,
    metric: str = "top1",
) -> Path:
    """Grouped bars per allocation: every new model's cross test (solid) and self test (light), with
    the old model's self test as a dashed line: a cross bar above the line meets the criterion.
    ``values[allocation][model] = (cross, self)`` as fractions."""
    if not values:
        raise DataError("plot_summary needs at least one allocation")
    allocations = list(values)
    models = list(dict.fromkeys(m for a in allocations for m in values[a]))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(allocations) * max(1, len(models)) / 4), 4.5))
    colors = plt.get_cmap("tab10")
    for k, model in enumerate(models):
        xs = np.arange(len(allocations)) - 0.4 + width * (k + 0.5)
        pct = np.array([values[a].get(model, (None, None)) for a in allocations], dtype=np.float64) * 100
        cross, self_ = pct[:, 0], pct[:, 1]
        ax.bar(xs, self_, width, color=colors(k % 10), alpha=0.3)
        ax.bar(xs, cross, width * 0.6, color=colors(k % 10), label=model)
    for i, a in enumerate(allocations):
        if old_self.get(a) is not None:
            ax.hlines(100 * float(old_self[a]), i - 0.45, i + 0.45, colors="black", linestyles="dashed")
    ax.set_xticks(np.arange(len(allocations)), allocations)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric}: cross test (narrow bars) and self test (wide, light); dashed: old self test")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncols=min(8, len(models)), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)
