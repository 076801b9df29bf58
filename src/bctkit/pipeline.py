"""The end-to-end run: allocate -> train old -> cache old features -> train new models -> extract ->
evaluate -> report. Every stage writes its output atomically under the run directory; with
``resume`` finished models are reused and interrupted ones continue from their last checkpoint."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bctkit.cache import OldFeatureCache, as_tensor
from bctkit.config import MethodConfig, ModelConfig, RunConfig
from bctkit.data import allocate
from bctkit.data.datasets import load_datasets
from bctkit.data.imageset import ImageSet
from bctkit.evaluation.protocols import EvalProtocol
from bctkit.evaluation.report import write_summary
from bctkit.evaluation.suite import evaluate_suite
from bctkit.features import FeatureSet, extract
from bctkit.losses import CompatContext, CompatibilityTerm, build_term
from bctkit.models.store import LoadedModel, load_model, save_model
from bctkit.storage import write_json
from bctkit.training import TrainConfig, train_model
from bctkit.training.checkpoint import checkpoint_run_id


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_seed(seed: int, name: str) -> int:
    """Initialisation seed of model ``name``: derived from the configured seed and the name, so
    old and new models never share initial weights (a shared initialisation makes an independently
    trained new model look partly compatible with the old one)."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Run:
    """One pipeline run in ``out``; see :func:`run_pipeline`."""

    def __init__(self, cfg: RunConfig, out: Path, resume: bool, progress: bool,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.out, self.resume, self.progress, self.log = cfg, out, resume, progress, log
        self.models_info: dict[str, dict[str, Any]] = {}

    def train_or_load(
        self, name: str, train_set: ImageSet, model_cfg: ModelConfig, train_cfg: TrainConfig,
        key: str, term: CompatibilityTerm | None = None, ctx: CompatContext | None = None,
        method: MethodConfig | None = None,
    ) -> LoadedModel:
        folder = self.out / "models" / name
        path = folder / "model.safetensors"
        if self.resume and path.exists():
            loaded = load_model(path)
            if loaded.meta.get("run_id") == key:
                self.log(f"[{name}] reusing finished model {path}")
                self._record(name, loaded)
                return loaded
        self.log(f"[{name}] training on {len(train_set)} images, {train_set.num_classes} classes")
        ckpt = folder / "checkpoint.safetensors"
        resume = self.resume and ckpt.exists()
        if resume and checkpoint_run_id(ckpt) != key:
            self.log(f"[{name}] checkpoint is from another configuration; training from scratch")
            resume = False
        t0 = time.perf_counter()
        result = train_model(
            train_set, model_cfg.backbone, model_cfg.head, train_cfg, term=term, ctx=ctx,
            checkpoint=ckpt, resume=resume, run_id=key,
            desc=name, progress=self.progress, init_seed=model_seed(train_cfg.seed, name),
        )
        d_o, d_n = self.cfg.old.backbone.embedding_dim, model_cfg.backbone.embedding_dim
        meta = {
            "name": name,
            "run_id": key,
            "method": None if method is None else method.method,
            "params": None if method is None else method.params,
            "train": train_cfg.model_dump(mode="json"),
            "train_images": len(train_set),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "compat_dims": None if term is None else term.compatible_dims(d_o, d_n),
            "history": result.history,
        }
        save_model(path, result.backbone, result.head, model_cfg.head, meta)
        loaded = load_model(path)
        self._record(name, loaded)
        return loaded

    def _record(self, name: str, model: LoadedModel) -> None:
        m = model.meta
        self.models_info[name] = {
            "method": m.get("method"),
            "params": m.get("params"),
            "fingerprint": m["fingerprint"],
            "train_images": m["train_images"],
            "num_classes": m["num_classes"],
            "embedding_dim": m["backbone"]["embedding_dim"],
            "compat_dims": m.get("compat_dims"),
            "config": {"backbone": m["backbone"], "head": m["head"], "train": m["train"]},
            "final_loss": m["history"][-1]["loss"] if m.get("history") else None,
            "train_seconds": m.get("train_seconds"),
        }

    def old_features(self, old: LoadedModel, new_set: ImageSet) -> torch.Tensor:
        """Old-model features of the new training images (un-augmented), from the shared
        memory-mapped cache: computed once per (old model, images, transform, dtype)."""
        c = self.cfg.cache
        root = Path(c.dir) if c.dir else self.out / "cache"
        cache = OldFeatureCache(root, log=self.log)
        feats = cache.get(old.backbone, old.fingerprint, new_set.images, new_set.fingerprint(), flip=c.flip,
                          batch_size=self.cfg.evaluation.batch_size, progress=self.progress, dtype=c.dtype)
        return as_tensor(feats)

    def execute(self) -> dict[str, Any]:
        cfg, out = self.cfg, self.out
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg.model_dump(mode="json"))
        pool, eval_set = load_datasets(cfg.data)
        alloc = allocate(pool.labels, cfg.allocation.scenario, cfg.allocation.ratio, cfg.allocation.seed)
        self.log(f"[data] {pool.name}: {len(pool)} images, {pool.num_classes} classes; "
                 f"eval {len(eval_set)} images, {eval_set.num_classes} held-out classes")
        self.log(f"[allocation] {alloc.summary()}")
        old_set = pool.subset(alloc.old_indices, alloc.old_labels)
        new_set = pool.subset(alloc.new_indices, alloc.new_labels)
        # What a trained model depends on: the training pool and allocation, not the evaluation set.
        data_key = {"data": cfg.data.model_dump(exclude={"eval_classes", "eval_images_per_class"}),
                    "allocation": cfg.allocation.model_dump()}
        old = self.train_or_load(
            "old", old_set, cfg.old, cfg.old.train, _key({**data_key, "model": cfg.old.model_dump()})
        )
        old_feats = self.old_features(old, new_set)
        models: dict[str, LoadedModel] = {"old": old}
        entries = [("paragon", MethodConfig(method="independent"))]
        entries += [(m.display_name, m) for m in cfg.methods]
        for name, method in entries:
            term = build_term(method.method, method.params)
            ctx = CompatContext(
                old_embedding_dim=cfg.old.backbone.embedding_dim,
                new_embedding_dim=cfg.new.backbone.embedding_dim,
                num_new_classes=alloc.num_new_classes,
                new_to_old=torch.from_numpy(alloc.new_to_old),
                train_labels=torch.from_numpy(new_set.labels),
                old_train_feats=old_feats if term.needs_old_features else None,
                old_model=old.backbone,
                old_head=old.head,
                train_images=new_set.images,
            )
            train_cfg = method.train or cfg.new.train
            old_dep = None if method.method == "independent" else old.fingerprint
            key = _key({**data_key, "model": cfg.new.model_dump(), "train": train_cfg.model_dump(),
                        "method": method.model_dump(), "old": old_dep})
            models[name] = self.train_or_load(name, new_set, cfg.new, train_cfg, key, term, ctx, method)

        features = {}
        eval_labels = torch.from_numpy(eval_set.labels)
        eval_fp = eval_set.fingerprint()
        for name, model in models.items():
            feats = extract(model.backbone, eval_set.images, cfg.evaluation.batch_size,
                            flip=cfg.evaluation.flip, progress=self.progress, desc=f"eval {name}")
            fs = FeatureSet(feats, eval_labels, {
                "model": name, "model_fingerprint": model.fingerprint,
                "compat_dims": model.meta.get("compat_dims"), "flip": cfg.evaluation.flip,
                "dataset": eval_set.name, "images_fingerprint": eval_fp,
                **{k: self.models_info[name][k] for k in ("method", "params", "train_images", "num_classes")},
            })
            fs.save(out / "features" / f"{name}.safetensors")
            features[name] = fs
        ev = cfg.evaluation
        protocol = EvalProtocol(eval_set.name, eval_labels, ev.gallery_per_class, tuple(ev.fars),
                                tuple(ev.topk), tuple(ev.fpirs), ev.retrieval)
        extra = {
            "dataset": f"{eval_set.name}: {len(eval_set)} images of {eval_set.num_classes} "
                       f"identities never used in training",
            "allocation": alloc.summary(),
            "config": cfg.model_dump(mode="json"),
        }
        report = evaluate_suite(features, protocol, out, self.models_info, extra, backfill=ev.backfill)
        self.log(f"[report] {out / 'report.md'}")
        return report


def run_pipeline(
    cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True,
    log: Callable[[str], None] = _stderr,
) -> dict[str, Any]:
    """Run the whole pipeline for ``cfg`` into ``out``; returns the report dictionary."""
    return Run(cfg, Path(out), resume, progress, log).execute()


__all__ = ["run_pipeline"]


def run_scenarios(
    cfg: RunConfig, out: str | Path, scenarios: list[str], resume: bool = False, progress: bool = True,
    log: Callable[[str], None] = _stderr,
) -> dict[str, dict[str, Any]]:
    """Run the pipeline once per allocation scenario into ``out/<scenario>`` and write the combined
    table (UniBCT Table 2 layout) to ``out/summary.md`` and ``out/summary.json``."""
    out = Path(out)
    reports = {}
    for scenario in scenarios:
        log(f"=== allocation {scenario} ===")
        sub = cfg.model_copy(update={"allocation": cfg.allocation.model_copy(update={"scenario": scenario})})
        reports[scenario] = run_pipeline(sub, out / scenario, resume=resume, progress=progress, log=log)
    write_summary(out, reports, cfg.evaluation.fars)
    return reports
