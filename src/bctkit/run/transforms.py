"""A run's old-to-new transformations (config ``transforms``): trained after the new models on the
training images' (cached old feature, target's feature) pairs, then applied to the old model's
features of the evaluation images, where h(old) is a gallery model like any other.

Nothing here reads an image but the target's (and the side model's) one pass over the training
images, through the same memory-mapped cache as the old features. A finished transformation of the
same configuration is reused; an interrupted one resumes from its epoch checkpoint.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from bctkit.engine.distributed import barrier, gather_rows, is_main
from bctkit.engine.loader import Feed
from bctkit.evaluation.transformed import method_of, transform_meta, transformed_set
from bctkit.features import FeatureSet, extract_share
from bctkit.models.store import LoadedModel, load_model
from bctkit.models.transformation import (
    LoadedTransformation,
    TransformationConfig,
    load_transformation,
    save_transformation,
)
from bctkit.run.config import FeatureTransformConfig
from bctkit.run.keys import KEY, run_key
from bctkit.training.transformation import describe, train_transformation

if TYPE_CHECKING:
    from bctkit.run.benchmark import Run


@dataclass
class TrainedTransform:
    """One configured transformation, trained (or reused), with its side model."""

    cfg: FeatureTransformConfig
    h: LoadedTransformation
    side: LoadedModel | None
    info: dict[str, Any]

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def target(self) -> str:
        return str(self.cfg.target)


def folder_name(name: str) -> str:
    """The models/ folder of transformation ``name`` (``h(old)`` -> ``h_old_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def train_transforms(run: Run, models: dict[str, LoadedModel]) -> list[TrainedTransform]:
    """Train (or reuse) every configured transformation of ``run`` on its methods' training set."""
    if not run.cfg.transforms:
        return []
    assert run.trained_on is not None
    train_set, _ = run.trained_on
    return [_one(run, t, models["old"], models[str(t.target)], train_set) for t in run.cfg.transforms]


def _one(run: Run, t: FeatureTransformConfig, old: LoadedModel, target: LoadedModel, train_set: Feed
         ) -> TrainedTransform:
    side = load_model(t.side_info) if t.side_info else None  # type: ignore[arg-type]
    folder = run.out / "models" / folder_name(t.name)
    path, ckpt = folder / "transform.safetensors", folder / "checkpoint.safetensors"
    config = TransformationConfig(old_dim=old.output_dim, new_dim=target.output_dim,
                                  side_dim=0 if side is None else side.output_dim,
                                  inner_dim=t.inner_dim, uncertainty=t.uncertainty)
    key = run_key({"old": old.fingerprint, "target": target.fingerprint,
                   "side": None if side is None else side.fingerprint,
                   "images": train_set.source.fingerprint(),
                   "config": config.model_dump(), "train": t.train.model_dump(context=KEY)})
    if path.is_file():
        h = load_transformation(path)
        if h.meta.get("config_key") == key:
            run.log(f"[{t.name}] reusing finished transformation {path}")
            return TrainedTransform(t, h, side, _info(t, h, target))
    x = torch.as_tensor(run.cached_features(old, train_set))
    y = torch.as_tensor(run.cached_features(target, train_set))
    s = None if side is None else torch.as_tensor(run.cached_features(side, train_set))
    if is_main():
        kind = "FastFill (with uncertainty)" if t.uncertainty else "FCT"
        run.log(f"[{t.name}] training {kind} h: {config.old_dim}-d old -> {config.new_dim}-d {t.target} on "
                f"{len(x)} training images' features")
        t0 = time.perf_counter()
        folder.mkdir(parents=True, exist_ok=True)
        result = train_transformation(x, y, config, t.train, side=s, device=run.engine.device,
                                      checkpoint=ckpt, run_id=key, progress=run.progress, desc=t.name,
                                      log=run.log)
        run.log(f"[{t.name}] {describe(result.history)}")
        save_transformation(path, result.net, {
            "name": t.name, "target": t.target, "config_key": key, "old_fingerprint": old.fingerprint,
            "new_fingerprint": target.fingerprint,
            "side_fingerprint": None if side is None else side.fingerprint,
            "train": t.train.model_dump(mode="json"), "train_images": len(x),
            "train_data": train_set.source.fingerprint(),
            "train_seconds": round(time.perf_counter() - t0, 1), "history": result.history,
        })
    barrier()
    h = load_transformation(path)
    return TrainedTransform(t, h, side, _info(t, h, target))


def _info(t: FeatureTransformConfig, h: LoadedTransformation, target: LoadedModel) -> dict[str, Any]:
    """The report's Models entry of h(old): a gallery model whose fingerprint is h's composed with
    the old model's (the gallery version ``bctkit gallery transform`` writes)."""
    history = h.meta.get("history") or []
    return {
        "method": method_of(h),
        "params": {"target": t.target, "inner_dim": t.inner_dim, "uncertainty": t.uncertainty,
                   **({"side_info": t.side_info} if t.side_info else {})},
        "fingerprint": h.version, "train_images": h.meta.get("train_images"),
        "num_classes": target.meta.get("num_classes"), "embedding_dim": h.config.new_dim,
        "compat_dims": None, "layout": target.meta.get("layout"),
        "config": {"transform": h.config.model_dump(), "train": h.meta.get("train")},
        "final_loss": history[-1]["loss"] if history else None, "train_seconds": h.meta.get("train_seconds"),
        "transform": transform_meta(h),
    }


def side_features(run: Run, trained: list[TrainedTransform], eval_feed: Feed
                  ) -> dict[str, torch.Tensor | None]:
    """Each side model's features of the evaluation images (a collective call: every rank makes it;
    rank 0 gets the rows, the others None)."""
    out: dict[str, torch.Tensor | None] = {}
    for tt in trained:
        if tt.side is None:
            continue
        share = extract_share(tt.side.backbone.to(run.engine.device), run.feed_for(tt.side, eval_feed),
                              run.cfg.evaluation.batch_size, flip=run.cfg.evaluation.flip,
                              progress=run.progress,
                              desc=f"eval {tt.name} side", engine=run.engine)
        out[tt.name] = gather_rows(share)
    return out


def transformed_features(trained: list[TrainedTransform], features: dict[str, FeatureSet],
                         sides: dict[str, torch.Tensor | None]
                         ) -> tuple[dict[str, FeatureSet], dict[str, dict[str, Any]]]:
    """(h(old) features of the evaluation images by transformation name, and what the evaluation
    needs of each: its target and h's log sigma^2 per image)."""
    out, how = {}, {}
    for tt in trained:
        fs, log_var = transformed_set(tt.name, tt.h, features["old"], features[tt.target], {
            k: tt.info[k] for k in ("method", "params", "train_images", "num_classes")}, sides.get(tt.name))
        out[tt.name] = fs
        how[tt.name] = {"target": tt.target, "log_var": log_var}
    return out, how
