"""What UniBCT's prototypes look like in a finished all-allocation run (docs/results.md, "What the
refinement does on glyphs"). Training data only; prints one JSON line per allocation.

For each allocation: the new training set, the cached old features, and the new features of one
trained model (``--model``, default ``unibct``) on the un-augmented training images. Then, per
temperature in ``--tau``: the refinement weights' effective sample share and low-weight share
(``bctkit.losses.unibct.weight_summary``), and the mean cosine of the avg and refined prototypes to a
reference per class:

- clean data: the old classifier's row of the class (classes the old model knows);
- ``data.label_noise > 0``: the mean old feature of the images that truly belong to the class (the
  clean labels), plus the ROC AUC with which a low weight flags a relabelled image.

Usage: python scripts/prototype_study.py RUN_DIR [--model unibct] [--tau 0.05 0.2] [--lam 0.9]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bctkit.data import SCENARIOS, allocate
from bctkit.data.datasets import load_datasets
from bctkit.data.transforms import Preprocess
from bctkit.engine.loader import Feed
from bctkit.evaluation.verification import roc_auc
from bctkit.features import extract
from bctkit.losses.unibct import class_means, refinement_weights, weight_summary, weighted_means
from bctkit.models.store import load_model
from bctkit.run.benchmark import Run
from bctkit.run.config import parse_config


def mean_cos(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> float:
    return round(float((F.normalize(a[rows], dim=1) * F.normalize(b[rows], dim=1)).sum(1).mean()), 4)


def study(run_dir: Path, model: str, taus: list[float], lam: float) -> dict:
    cfg = parse_config(json.loads((run_dir / "config.json").read_text()))
    pool, _ = load_datasets(cfg.data, progress=False)
    alloc = allocate(pool.labels, cfg.allocation.scenario, cfg.allocation.ratio, cfg.allocation.seed)
    new_set = Feed(pool.subset(alloc.new_indices, alloc.new_labels), Preprocess(cfg.data.transform))
    old = load_model(run_dir / "models" / "old" / "model.safetensors")
    old_feats = Run(cfg, run_dir, True, False, lambda _: None).cached_features(old, new_set).float()
    labels, c = torch.from_numpy(new_set.source.labels), new_set.source.num_classes
    out: dict = {"allocation": cfg.allocation.scenario, "classes": c,
                 "images_per_class": round(len(new_set) / c, 2)}
    flipped = None
    if cfg.data.label_noise > 0:
        clean, _ = load_datasets(cfg.data.model_copy(update={"label_noise": 0.0}), progress=False)
        flipped = clean.labels[alloc.new_indices] != pool.labels[alloc.new_indices]
        keep = torch.from_numpy(~flipped)
        reference = class_means(old_feats[keep], labels[keep], c, allow_empty=True)
        rows = reference.norm(dim=1) > 0
        out["relabelled_share"] = round(float(flipped.mean()), 3)
    else:
        rows = torch.from_numpy(alloc.new_to_old) >= 0
        reference = torch.zeros(c, old.head.weight.shape[1])
        reference[rows] = old.head.weight.detach().float()[torch.from_numpy(alloc.new_to_old)[rows]]
    has_reference = bool(rows.any())  # open-class: the old model knows none of the classes
    out["cos_avg"] = mean_cos(class_means(old_feats, labels, c), reference, rows) if has_reference else None
    new = extract(load_model(run_dir / "models" / model / "model.safetensors").backbone, new_set,
                  progress=False)[:, : old_feats.shape[1]]
    sizes = np.bincount(new_set.source.labels, minlength=c)[new_set.source.labels]
    for tau in taus:
        w = refinement_weights(new, labels, c, lam=lam, tau=tau)
        refined = weighted_means(old_feats, w, labels, c)
        res = {"cos_refined": mean_cos(refined, reference, rows) if has_reference else None,
               **{k: round(v, 4) for k, v in weight_summary(w, labels, c).items()}}
        if flipped is not None:
            mw = w.numpy() * sizes
            res.update({"mw_relabelled": round(float(mw[flipped].mean()), 3),
                        "mw_clean": round(float(mw[~flipped].mean()), 3),
                        "auroc_low_weight_flags_relabelled": round(roc_auc(-mw, flipped), 3)})
        out[f"tau={tau}"] = res
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="an all-allocation run directory (bctkit run --scenarios all)")
    p.add_argument("--model", default="unibct", help="trained model whose features make the graph")
    p.add_argument("--tau", type=float, nargs="+", default=[0.05])
    p.add_argument("--lam", type=float, default=0.9)
    args = p.parse_args()
    for scenario in SCENARIOS:
        if (args.run / scenario / "config.json").exists():
            print(json.dumps(study(args.run / scenario, args.model, args.tau, args.lam)), flush=True)


if __name__ == "__main__":
    main()
