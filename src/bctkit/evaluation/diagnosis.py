"""A diagnosis of each cross test whose compatibility criterion failed or nearly failed: hubness of
the cross queries, cosines between the new and old features of the same images, and one sentence
naming the likely cause and the option to change (docs/evaluation.md, "Diagnosis").

Pure functions of feature arrays and the report's records; the run passes what it has of the
training images through a :data:`TrainProvider`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bctkit.errors import DataError
from bctkit.evaluation.protocols import EvalProtocol, Protocol, comparable
from bctkit.evaluation.search import normalized, topk_search
from bctkit.features import FeatureSet

NEAR_MARGIN = 0.01
"""A passed criterion is diagnosed too when the cross test beats the old self test by less than this
(1 percentage point of the certificate's metric)."""
HUB_TOP_FRACTION = 0.01
"""The "most returned" gallery items: the top 1 % of the gallery by top-1 count (at least one item)."""
HUB_SHARE = 0.25
HUB_RATIO = 2.0
"""Hubs: the most returned items take at least 25 % of the cross queries' top-1 results and at least
twice their share of the old model's own queries."""
COLLAPSE_MARGIN = 0.1
"""Collapse: the new features' mean cosine to the old features' mean direction exceeds the old
features' own by at least this."""
UNSEEN_GAP = 0.1
"""Unseen classes left behind: the same-image cosine on training images of classes the old
classifier knew exceeds that on the other classes by at least this."""
MIN_GROUP = 10
"""Fewest sampled training images of a group (known / unseen classes) for its cosine to count."""


@dataclass
class TrainFeatures:
    """New and old features of the same training images (a sample), and for each image whether the
    old classifier knew its class (None: not known)."""

    new: torch.Tensor
    old: torch.Tensor
    known: np.ndarray | None
    note: str = ""


TrainProvider = Callable[[str, str], TrainFeatures | None]
"""(new model, old model) -> their features of training images, or None where the run has none."""


def same_image_cosine(new: torch.Tensor, old: torch.Tensor) -> float:
    """Mean over rows of cos(new_i, old_i); NaN for no rows."""
    if new.shape != old.shape:
        raise DataError(f"new features {tuple(new.shape)} and old features {tuple(old.shape)} differ in "
                        "shape; expected the same images and coordinates")
    if new.shape[0] == 0:
        return math.nan
    a, b = normalized(new, "new").double(), normalized(old, "old").double()
    return float((a * b).sum(1).mean())


def mean_direction_cosine(feats: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean cosine of the rows of ``feats`` to the mean direction of ``ref`` (the normalised mean of
    its normalised rows)."""
    u = torch.nn.functional.normalize(normalized(ref, "ref").double().sum(0), dim=0)
    return float((normalized(feats, "feats").double() @ u).mean())


def same_class_cosine(feats: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
    """Mean cosine over all ordered pairs of distinct images of one class (pooled over classes):
    how close one model's images of one identity are; NaN when no class has two images."""
    x = normalized(feats, "feats").double()
    _, inv = np.unique(np.asarray(labels).ravel(), return_inverse=True)
    codes = torch.as_tensor(inv.ravel().astype(np.int64))
    sums = torch.zeros(int(codes.max()) + 1 if len(codes) else 0, x.shape[1], dtype=torch.float64)
    sums.index_add_(0, codes, x)
    counts = torch.bincount(codes, minlength=sums.shape[0]).double()
    pairs = float((counts * (counts - 1)).sum())
    if pairs == 0:
        return math.nan
    return float(((sums * sums).sum(1) - counts).sum() / pairs)


def hubness(top1: np.ndarray, gallery_rows: np.ndarray, gallery_labels: np.ndarray) -> dict[str, Any]:
    """How concentrated the top-1 results ``top1`` (gallery positions, one per query) are: the share
    taken by the top :data:`HUB_TOP_FRACTION` most returned items and by the single most returned
    one (its evaluation-set row and class), and how many distinct items were returned."""
    n_gallery = len(gallery_rows)
    counts = np.bincount(np.asarray(top1, np.int64), minlength=n_gallery)
    order = np.argsort(-counts, kind="stable")
    k = max(1, math.ceil(HUB_TOP_FRACTION * n_gallery))
    n = int(counts.sum())
    first = int(order[0])
    return {"queries": n, "gallery_items": n_gallery, "top_items": k,
            "top_share": float(counts[order[:k]].sum() / n), "max_share": float(counts[first] / n),
            "max_item": {"position": first, "row": int(gallery_rows[first]),
                         "label": gallery_labels[first].item()},
            "distinct": int((counts > 0).sum())}


def top1_positions(queries: torch.Tensor, gallery: torch.Tensor) -> np.ndarray:
    """The gallery position of each query's most similar item (cosine; ties: lowest position)."""
    _, idx = topk_search(normalized(queries, "queries"), normalized(gallery, "gallery"), 1)
    return idx[:, 0].numpy()


def flagged(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The certificate results (one per claimed pair) that failed, or passed by less than
    :data:`NEAR_MARGIN`, each with its ``status`` ("failed" / "near")."""
    out = []
    transformed = set(report.get("transforms") or {})  # h(old) is no trained model: no training cause
    for c in report.get("certificate_results", []):
        if c["gallery"] in transformed:
            continue
        cross, base = c.get("cross"), c.get("old_self")
        if not c["passed"]:
            out.append({**c, "status": "failed"})
        elif cross is not None and base is not None and cross - base < NEAR_MARGIN:
            out.append({**c, "status": "near"})
    return out


def _train_cosines(train: TrainFeatures, q_dims: int, g_dims: int) -> dict[str, Any]:
    new, old = train.new[:, :q_dims], train.old[:, :g_dims]
    out: dict[str, Any] = {"images": int(new.shape[0]), "same_image": same_image_cosine(new, old),
                           "new_to_old_mean": mean_direction_cosine(new, old),
                           "old_to_old_mean": mean_direction_cosine(old, old), "note": train.note}
    if train.known is not None:
        known = np.asarray(train.known, bool)
        for key, mask in (("known", known), ("unseen", ~known)):
            rows = torch.as_tensor(np.nonzero(mask)[0])
            out[f"{key}_images"] = int(len(rows))
            out[key] = same_image_cosine(new[rows], old[rows]) if len(rows) >= MIN_GROUP else None
    return out


def measure(new: FeatureSet, old: FeatureSet, protocol: Protocol | None,
            train: TrainFeatures | None) -> dict[str, Any]:
    """The diagnosis numbers of one (new, old) pair: hubness (the run's split protocol only), the
    cosines on the test images and, where given, on training images."""
    view = comparable(new, old)
    if view is None:
        raise DataError("the new and old features share no coordinates to compare")
    q, g, _ = view
    test = {"images": int(q.shape[0]), "same_image": same_image_cosine(q, g),
            "new_to_old_mean": mean_direction_cosine(q, g), "old_to_old_mean": mean_direction_cosine(g, g),
            "old_same_class": same_class_cosine(g, old.labels)}
    hub = None
    if isinstance(protocol, EvalProtocol):
        g_idx, p_idx = protocol.split()
        rows, labels = g_idx.numpy(), protocol.labels[g_idx]
        if len(g_idx) and len(p_idx):  # hubness needs a gallery and probes
            hub = {"cross": hubness(top1_positions(q[p_idx], g[g_idx]), rows, labels),
                   "old_self": hubness(top1_positions(g[p_idx], g[g_idx]), rows, labels)}
    return {"hubness": hub, "test": test,
            "train": None if train is None else _train_cosines(train, q.shape[1], g.shape[1])}


def _paths(report: dict[str, Any], name: str) -> tuple[str, str, str]:
    """(the method's config path, its training config path, its weight options) for the advice."""
    methods = (report.get("config") or {}).get("methods") or []
    index = next((i for i, m in enumerate(methods) if (m.get("name") or m.get("method")) == name), None)
    where = f"methods.{index}" if index is not None else f"the options of {name}'s method"
    train = f"{where}.train" if index is not None and methods[index].get("train") else "new.train"
    params = (report.get("models", {}).get(name) or {}).get("params") or {}
    weights = [k for k in params if "weight" in k] or ["weight"]
    return where, train, " / ".join(f"{where}.params.{k}" for k in weights)


def cause(numbers: dict[str, Any], method: str | None, paths: tuple[str, str, str]) -> tuple[str, str]:
    """(cause, one sentence naming it and the option to change): the first rule of
    docs/evaluation.md ("Diagnosis") that holds."""
    where, train, weight = paths
    t, tr, hub = numbers["test"], numbers["train"], numbers["hubness"]
    if method == "independent":
        return "independent", ("The model trained with no compatibility term (method independent): it is "
                               "not expected to be compatible; use a compatibility method for an upgrade.")
    if t["new_to_old_mean"] >= t["old_to_old_mean"] + COLLAPSE_MARGIN:
        return "collapse", (
            f"The new features collapsed towards the old features' mean direction (mean cosine "
            f"{t['new_to_old_mean']:.2f} to it, the old features' own {t['old_to_old_mean']:.2f}): the "
            f"compatibility weight is too high or the new model trains without warm-up: lower {weight}, "
            f"or set {train}.schedule.warmup_epochs and {train}.grad_clip.")
    known, unseen = (tr or {}).get("known"), (tr or {}).get("unseen")
    if known is not None and unseen is not None and known - unseen >= UNSEEN_GAP:
        return "unseen", (
            f"The new features of classes the old classifier did not know moved away from their old "
            f"features (same-image cosine {unseen:.2f} against {known:.2f} on known classes): the "
            f"compatibility term holds only the old classes; use a method that compares every image with "
            f"its old feature (l2) or raise {weight}.")
    if t["same_image"] < t["old_same_class"]:
        return "drift", (
            f"The new features moved away from the old ones (same-image cosine {t['same_image']:.2f}, "
            f"below the {t['old_same_class']:.2f} between old features of one class): the compatibility "
            f"term is too weak: raise {weight}, or train longer ({train}.epochs).")
    cross = hub["cross"] if hub is not None else None
    if cross is not None and cross["top_share"] >= max(HUB_SHARE, HUB_RATIO * hub["old_self"]["top_share"]):
        return "hubs", (
            f"A few old gallery items are the top-1 of most new queries ({100 * cross['top_share']:.1f} % "
            f"to the top {cross['top_items']}) though each new feature stays near its old one: the "
            f"new features share a shift the cosines do not show; add warm-up and gradient clipping "
            f"({train}.schedule.warmup_epochs, {train}.grad_clip) or lower {train}.optimizer.lr.")
    return "unclear", (
        "No collapse, drift or hubs: the new features stay near the old ones and the cross test is at the "
        f"old model's level; the new model is not better than the old one yet: train longer ({train}.epochs) "
        "or a larger new model (new.backbone).")


def diagnose(report: dict[str, Any], features: dict[str, FeatureSet], protocol: Protocol | None,
             train: TrainProvider | None = None) -> list[dict[str, Any]]:
    """One entry per flagged pair (see :func:`flagged`): its criterion, the numbers of
    :func:`measure` and the likely cause; empty when every claim passed by at least
    :data:`NEAR_MARGIN`."""
    out = []
    for c in flagged(report):
        query, gallery = c["query"], c["gallery"]
        sample = train(query, gallery) if train is not None else None
        numbers = measure(features[query], features[gallery], protocol, sample)
        method = (report.get("models", {}).get(query) or {}).get("method")
        kind, sentence = cause(numbers, method, _paths(report, query))
        out.append({"query": query, "gallery": gallery, "metric": c["metric"], "cross": c["cross"],
                    "old_self": c["old_self"], "status": c["status"], **numbers, "cause": kind,
                    "advice": sentence})
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _cos(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _hub_line(name: str, h: dict[str, Any]) -> str:
    m = h["max_item"]
    return (f"{name}: the top {h['top_items']} of {h['gallery_items']} gallery items take "
            f"{_pct(h['top_share'])} % of {h['queries']} top-1 results; the most returned (gallery item "
            f"{m['position']}, evaluation row {m['row']}, class {m['label']}) {_pct(h['max_share'])} %; "
            f"{h['distinct']} distinct items returned")


def markdown_lines(diagnosis: list[dict[str, Any]]) -> list[str]:
    """The report.md section "Diagnosis" (nothing when no claim failed or nearly failed)."""
    if not diagnosis:
        return []
    lines = ["## Diagnosis", "",
             f"Each claim whose criterion failed, or passed by less than {100 * NEAR_MARGIN:g} point: why, "
             "as far as the features tell (rules: docs/evaluation.md, \"Diagnosis\"). Cosines of the "
             "compared coordinates; the test identities are held out from every model's training.", ""]
    for d in diagnosis:
        t, tr, hub = d["test"], d["train"], d["hubness"]
        lines += [f"### {d['query']} → {d['gallery']}: {d['metric']} {d['status']} "
                  f"(cross {_pct(d['cross'])}, old self {_pct(d['old_self'])})", ""]
        if hub is not None:
            lines += ["- Hubness, " + _hub_line("cross queries", hub["cross"]) + ".",
                      "- Hubness, " + _hub_line("old self test", hub["old_self"]) + "."]
        lines += [f"- Same-image cosine new/old, test images ({t['images']}): {_cos(t['same_image'])}; "
                  f"old features of one class: {_cos(t['old_same_class'])}.",
                  "- Cosine to the old features' mean direction, test images: new "
                  f"{_cos(t['new_to_old_mean'])}, old {_cos(t['old_to_old_mean'])}."]
        if tr is None:
            lines.append("- Training images: not compared (only the test images' features were given).")
        else:
            split = "" if "known" not in tr else (
                f"; classes the old classifier knew {_cos(tr['known'])} ({tr['known_images']} images), "
                f"unseen {_cos(tr['unseen'])} ({tr['unseen_images']} images)")
            note = f", {tr['note']}" if tr["note"] else ""
            lines.append(f"- Same-image cosine new/old, training images ({tr['images']}{note}): "
                         f"{_cos(tr['same_image'])}{split}; to the old mean direction: new "
                         f"{_cos(tr['new_to_old_mean'])}, old {_cos(tr['old_to_old_mean'])}.")
        lines += [f"- **Likely cause ({d['cause']})**: {d['advice']}", ""]
    return lines
