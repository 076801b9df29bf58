"""PNG writers: valid files, atomic replacement, no temporary files left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bctkit.errors import DataError
from bctkit.evaluation import plots
from bctkit.evaluation.verification import roc_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png_only(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 1000
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_plot_roc(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(2000) < 0.3
    scores = rng.normal(size=2000) + labels
    fpr, tpr, _ = roc_curve(scores, labels)
    out = plots.plot_roc({"self": (fpr, tpr), "cross": (fpr, tpr**2)}, tmp_path / "roc.png")
    assert_png_only(out)


def test_plot_cmc_and_backfill(tmp_path: Path) -> None:
    p = plots.plot_cmc({"cross": {1: 0.5, 5: 0.7, 10: 0.8}}, tmp_path / "a" / "cmc.png")
    assert_png_only(p)
    fr = np.linspace(0, 1, 11)
    p = plots.plot_backfill({"random": (fr, fr), "distance": (fr, np.sqrt(fr))}, tmp_path / "b.png")
    assert p.read_bytes()[:8] == PNG_MAGIC


def test_plot_matrix_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "m.png"
    target.write_bytes(b"old content")
    m = np.array([[0.5, np.nan], [0.6, 0.8]])
    plots.plot_matrix(m, ["old", "new"], target, title="top-1")
    assert_png_only(target)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "m.png"
    target.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots.Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.plot_matrix(np.eye(2), ["a", "b"], target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        plots.plot_roc({}, tmp_path / "x.png")
    with pytest.raises(DataError, match="differ"):
        plots.plot_roc({"a": (np.zeros(3), np.zeros(2))}, tmp_path / "x.png")
    with pytest.raises(DataError, match="names"):
        plots.plot_matrix(np.eye(3), ["a", "b"], tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_no_figures_leak(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    plots.plot_cmc({"a": {1: 0.2, 2: 0.4}}, tmp_path / "c.png")
    with pytest.raises(DataError):
        plots.plot_backfill({"a": ([0.0, 1.0], [0.1])}, tmp_path / "b.png")
    assert len(plt.get_fignums()) == before


def test_plot_summary_draws_the_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"extended-data": {"paragon": (0.01, 0.9), "bct": (0.6, 0.85)},
              "open-class": {"paragon": (0.02, 0.8), "bct": (None, 0.7)}}
    out = plots.plot_summary(values, {"extended-data": 0.4, "open-class": 0.5}, tmp_path / "s.png")
    assert_png_only(out)
    captured = {}

    def keep(fig, path):
        captured["ax"] = fig.axes[0]
        return Path(path)

    monkeypatch.setattr(plots, "save_figure", keep)
    plots.plot_summary(values, {"extended-data": 0.4, "open-class": 0.5}, tmp_path / "t.png")
    heights = [round(p.get_height(), 6) for p in captured["ax"].patches]
    # per model: self bars (one per allocation), then cross bars; a missing value is NaN
    assert heights[:4] == [90.0, 80.0, 1.0, 2.0]
    assert heights[4:7] == [85.0, 70.0, 60.0] and np.isnan(heights[7])
    lines = captured["ax"].collections
    assert sorted(round(float(seg[0][1]), 6) for c in lines for seg in c.get_segments()) == [40.0, 50.0]


def test_curves_in_percent_legend_outside_one_colour_per_model(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Plots use percent like the tables; the legend sits outside the axes, so it cannot cover a curve;
    a model's self and cross curves share its colour (cross dashed) and the backfill plot uses it too."""
    captured: list = []

    def keep(fig, path):
        captured.append(fig.axes[0])
        return Path(path)

    monkeypatch.setattr(plots, "save_figure", keep)
    colour = plots.model_styles(["old", "l2"])
    styles = {"l2 / l2 (self)": {"color": colour["l2"], "linestyle": "-"},
              "l2 / old (cross)": {"color": colour["l2"], "linestyle": "--"}}
    fpr, tpr = np.array([1e-4, 1e-2, 1.0]), np.array([0.2, 0.5, 1.0])
    plots.plot_roc({k: (fpr, tpr) for k in styles}, tmp_path / "r.png", styles=styles)
    plots.plot_cmc({k: {1: 0.25, 5: 0.5} for k in styles}, tmp_path / "c.png", styles=styles)
    plots.plot_backfill({"l2 (random)": ([0.0, 1.0], [0.1, 0.3])}, tmp_path / "b.png",
                        styles={"l2 (random)": {"color": colour["l2"]}})
    roc, cmc, back = captured
    assert list(roc.lines[0].get_ydata()) == [20.0, 50.0, 100.0]
    assert list(cmc.lines[0].get_ydata()) == [25.0, 50.0]
    assert list(back.lines[0].get_xdata()) == [0.0, 100.0] and list(back.lines[0].get_ydata()) == [10.0, 30.0]
    assert "%" in roc.get_ylabel() and "%" in cmc.get_ylabel() and "%" in back.get_ylabel()
    for ax in (roc, cmc, back):
        assert ax.get_legend().get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1
    assert roc.lines[0].get_color() == roc.lines[1].get_color() == back.lines[0].get_color() == colour["l2"]
    assert roc.lines[1].get_linestyle() == "--"
