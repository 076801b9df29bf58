"""The end-to-end run: allocate -> train old -> cache old features -> train new models -> extract ->
evaluate -> report. Every stage writes its output atomically under the run directory; with
``resume`` finished models are reused and interrupted ones continue from their last checkpoint."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bctkit.data import allocate
from bctkit.data.allocation import Allocation, label_map
from bctkit.data.datasets import LoadedData, load_data
from bctkit.data.screening import check_identities, describe_notes
from bctkit.data.sources.base import DataSource
from bctkit.data.transforms import Preprocess
from bctkit.engine.compute import Engine
from bctkit.engine.distributed import barrier, gather_rows, is_main, rank0_first
from bctkit.engine.loader import Feed
from bctkit.errors import ConfigError
from bctkit.evaluation.report import report_dir
from bctkit.evaluation.suite import evaluate_suite
from bctkit.features import FeatureSet, extract_share
from bctkit.losses import CompatContext, CompatibilityTerm, build_term
from bctkit.losses.base import method_class
from bctkit.models.config import BackboneConfig, embedding_layout
from bctkit.models.store import LoadedModel, load_model, save_model
from bctkit.oldside.external import preprocess_of
from bctkit.run.cache import OldFeatureCache, as_tensor
from bctkit.run.config import MethodConfig, ModelConfig, RunConfig
from bctkit.run.continuation import KeyOf, adopt, plan_continuation, refuse_replacing, stored_key
from bctkit.run.keys import KEY, model_seed, read_config, run_key
from bctkit.run.prechecks import check_devices, check_inputs
from bctkit.run.testsets import describe_held_out, evaluate_test_sets, note_test_sets, run_protocol
from bctkit.run.trainsample import TrainSample
from bctkit.run.transforms import TrainedTransform, side_features, train_transforms, transformed_features
from bctkit.storage import check_writable_dir, write_json, write_text
from bctkit.training import TrainConfig, train_model
from bctkit.training.checkpoint import checkpoint_run_id


def stderr_log(msg: str) -> None:
    """The run's log on rank 0: one line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def _quiet(msg: str) -> None:
    """The log of ranks other than 0 (rank 0 speaks for the run)."""


class Run:
    """One pipeline run in ``out``; see :func:`run_pipeline`."""

    def __init__(self, cfg: RunConfig, out: Path, resume: bool, progress: bool,
                 log: Callable[[str], None], reuse_old: Path | None = None, overwrite: bool = False) -> None:
        check_devices(cfg)
        self.engine = Engine.create(cfg.new.train.device)
        main = self.engine.is_main
        self.cfg, self.out, self.resume, self.progress = cfg, out, resume, progress and main
        self.log = log if main else _quiet
        self.reuse_old = reuse_old  # a finished old model file (see _old_model_file) to copy in
        self.overwrite = overwrite
        self.models_info: dict[str, dict[str, Any]] = {}
        self.previous_config: dict[str, Any] | None = None  # the run folder's config before this run
        self.continued: list[str] = []  # the models this run trained further (more train.epochs)
        self.trained_on: tuple[Feed, np.ndarray] | None = None  # the methods' data, its new_to_old
        self.transforms: list[TrainedTransform] = []

    def train_or_load(
        self, name: str, train_set: Feed, model_cfg: ModelConfig, train_cfg: TrainConfig,
        key_of: KeyOf, term: CompatibilityTerm | None = None, ctx: CompatContext | None = None,
        method: MethodConfig | None = None, prev: LoadedModel | None = None,
    ) -> LoadedModel:
        """Model ``name``: with ``resume`` the finished one of this configuration (``key_of(train_cfg)``),
        or the finished one of fewer ``train.epochs`` trained further, or else trained here (from its
        checkpoint of this configuration when there is one)."""
        folder = self.out / "models" / name
        path, ckpt = folder / "model.safetensors", folder / "checkpoint.safetensors"
        key = key_of(train_cfg)
        if name == "old" and self.reuse_old is not None:
            adopted = adopt(self.reuse_old, key, path)
            self.log(f"[old] reusing {self.reuse_old}")
            return self._record(name, adopted)
        plan = None
        if self.resume and path.exists():
            loaded = load_model(path)
            if stored_key(loaded.meta) == key:
                self.log(f"[{name}] reusing finished model {path}")
                return self._record(name, loaded)
            plan = plan_continuation(loaded.meta, train_cfg, key_of, ckpt, self.overwrite)
        if path.exists() and not self.overwrite and plan is None:
            refuse_replacing(name, path, key, self.previous_config, self.cfg, self.continued)
        run_id, resume, extends = key, self.resume and checkpoint_run_id(ckpt) == key, None
        if plan is not None:
            run_id, resume, extends = plan.run_id, True, plan.extends
            self.log(f"[{name}] continuing the finished model from epoch {plan.epochs} to {train_cfg.epochs} "
                     "(only train.epochs changed)")
            self.continued.append(name)
        else:
            opt = train_cfg.optimizer
            scaled = (f" (= {opt.lr:g} x batch {train_cfg.batch_size} / {opt.lr_batch})"
                      if opt.lr_batch else "")
            self.log(f"[{name}] training on {len(train_set)} images, {train_set.source.num_classes} classes, "
                     f"lr {train_cfg.base_lr:g}{scaled}")
            if self.resume and ckpt.exists() and not resume:
                self.log(f"[{name}] checkpoint is from another configuration; training from scratch")
        t0 = time.perf_counter()
        result = train_model(
            train_set, model_cfg.backbone, model_cfg.head, train_cfg, term=term, ctx=ctx,
            checkpoint=ckpt, resume=resume, run_id=run_id, extends=extends,
            desc=name, progress=self.progress, init_seed=model_seed(train_cfg.seed, name), log=self.log,
        )
        compat_dims, prefixes, compatible_with = None, None, None
        if term is not None and prev is not None and method is not None and method.method != "independent":
            d_o = prev.output_dim
            compat_dims = term.compatible_dims(d_o, model_cfg.backbone.embedding_dim)
            prev_prefixes = prev.meta.get("compat_prefixes") or []
            prefixes = sorted({d_o, *prev_prefixes} - {model_cfg.backbone.output_dim}, reverse=True)
            compatible_with = prev.meta["name"]
        meta = {
            "name": name,
            "run_id": run_id,
            "config_key": key,
            "continued_from": [] if plan is None else plan.continued_from,
            "method": None if method is None else method.method,
            # every option the method ran with, defaults included (the config may give only some)
            "params": None if method is None or term is None else term.params.model_dump(mode="json"),
            "train": train_cfg.model_dump(mode="json"),
            "train_images": len(train_set),
            "train_data": train_set.source.fingerprint(),
            "preprocessing": train_set.spec(),
            "train_seconds": round(time.perf_counter() - t0 + (plan.train_seconds if plan else 0.0), 1),
            "compat_dims": compat_dims,
            "compat_prefixes": prefixes,
            "layout": embedding_layout(model_cfg.backbone),
            "compatible_with": compatible_with,
            "history": result.history,
        }
        if is_main():
            save_model(path, result.backbone, result.head, model_cfg.head, meta)
        barrier()
        return self._record(name, load_model(path))

    def _record(self, name: str, model: LoadedModel) -> LoadedModel:
        """Enter ``model`` in the report's models; returns it."""
        m = model.meta
        self.models_info[name] = {
            "method": m.get("method"),
            "params": m.get("params"),
            "fingerprint": m["fingerprint"],
            "train_images": m.get("train_images"),
            "num_classes": m["num_classes"],
            "embedding_dim": model.output_dim,
            "compat_dims": m.get("compat_dims"),
            "layout": m.get("layout"),
            "config": {"backbone": m.get("backbone"), "head": m.get("head"), "train": m.get("train")},
            "final_loss": m["history"][-1]["loss"] if m.get("history") else None,
            "train_seconds": m.get("train_seconds"),
        }
        if m.get("continued_from"):
            self.models_info[name]["continued_from"] = m["continued_from"]
        return model

    def cached_features(self, model: LoadedModel, images: Feed) -> torch.Tensor:
        """A frozen model's features of training images (un-augmented), from the shared
        memory-mapped cache: computed once per (model, images, preprocessing, dtype)."""
        if model.given is not None:  # an old model known only by its features
            return model.given[images.source.fingerprint()]
        c = self.cfg.cache
        cache = OldFeatureCache(Path(c.dir) if c.dir else self.out / "cache", log=self.log)
        net = model.backbone.to(self.engine.device)
        feats = cache.get(net, model.fingerprint, self.feed_for(model, images), flip=c.flip,
                          batch_size=self.cfg.evaluation.batch_size, progress=self.progress, dtype=c.dtype,
                          engine=self.engine)
        return as_tensor(feats)

    def compat_model(
        self, name: str, method: MethodConfig, train_set: Feed, new_to_old: np.ndarray,
        prev: LoadedModel, paragon: LoadedModel | None, set_key: dict[str, Any],
        backbone: BackboneConfig | None = None,
    ) -> LoadedModel:
        """Train (or reuse) model ``name`` with ``method`` against the frozen model ``prev``
        (architecture ``backbone``, default the run's new backbone)."""
        cfg = self.cfg
        term = build_term(method.method, method.params)
        d_o = prev.output_dim
        backbone = backbone or cfg.new.backbone
        model_cfg = cfg.new.model_copy(update={"backbone": term.backbone_config(backbone, d_o)})
        if term.needs_paragon_features and paragon is None:
            raise ConfigError(f"{name}: {method.method} needs an independently trained model of its data")
        ctx = CompatContext(
            old_embedding_dim=d_o,
            new_embedding_dim=backbone.embedding_dim,
            num_new_classes=train_set.source.num_classes,
            new_to_old=torch.from_numpy(new_to_old),
            train_labels=torch.from_numpy(train_set.source.labels),
            old_train_feats=self.cached_features(prev, train_set) if term.needs_old_features else None,
            old_model=prev.backbone,
            # A BT^2 model's classifier scores f, not the stored embedding: it has none to offer.
            old_head=None if prev.bt2 else prev.head,
            train_images=train_set,
            paragon_train_feats=(self.cached_features(paragon, train_set)
                                 if paragon is not None and term.needs_paragon_features else None),
        )
        train_cfg = method.train or cfg.new.train
        deps: dict[str, Any] = {"old": None if method.method == "independent" else prev.fingerprint}
        if term.needs_paragon_features and paragon is not None:
            deps["paragon"] = paragon.fingerprint

        def key_of(train: TrainConfig) -> str:
            # model_cfg holds new.train too, which is train_cfg unless the method has its own
            model = model_cfg if method.train is not None else model_cfg.model_copy(update={"train": train})
            return run_key({**set_key, "model": model.model_dump(context=KEY),
                            "train": train.model_dump(context=KEY), "method": method.model_dump(context=KEY),
                            **deps})

        return self.train_or_load(name, train_set, model_cfg, train_cfg, key_of, term, ctx, method, prev)

    def train_chain(
        self, pool: Feed, alloc: Allocation, paragon: LoadedModel | None, data_key: dict[str, Any],
        models: dict[str, LoadedModel],
    ) -> list[str]:
        """Train the chain's versions in order, each against the previous one (v1 = the old model);
        returns the chain's model names, oldest first. A version that needs an independently
        trained model of its own data (BT^2) gets one (the paragon when its data is the new set)."""
        cfg = self.cfg
        prev, prev_classes = models["old"], alloc.old_classes
        independents: dict[str, LoadedModel] = {}
        if paragon is not None:
            independents[run_key([None, cfg.new.backbone.model_dump()])] = paragon
        names = ["old"]
        for v in cfg.chain:
            if v.ratio is None:
                idx, classes, labels = alloc.new_indices, alloc.new_classes, alloc.new_labels
            else:
                part = allocate(pool.source.labels, cfg.allocation.scenario, v.ratio, cfg.allocation.seed,
                                cfg.allocation.classes)
                idx, classes, labels = part.old_indices, part.old_classes, part.old_labels
            train_set = pool.with_source(pool.source.subset(idx, labels))
            set_key = {**data_key, "chain_ratio": v.ratio}
            to_prev = label_map(classes, prev_classes)
            backbone = v.backbone or cfg.new.backbone
            independent = None
            if method_class(v.method).needs_paragon_features:
                ind_key = run_key([v.ratio, backbone.model_dump()])
                independent = independents.get(ind_key)
                if independent is None:
                    ind_name = f"{v.display_name}-independent"
                    independent = self.compat_model(ind_name, MethodConfig(method="independent"), train_set,
                                                    to_prev, prev, None, set_key, backbone)
                    self.models_info.pop(ind_name)
                    independents[ind_key] = independent
            model = self.compat_model(v.display_name, v, train_set, to_prev, prev, independent, set_key,
                                      backbone)
            models[v.display_name] = model
            names.append(v.display_name)
            prev, prev_classes = model, classes
        return names

    def execute(self) -> dict[str, Any]:
        cfg, out = self.cfg, self.out
        reports = report_dir(out, cfg.evaluation.split)
        self.previous_config = read_config(reports / "config.json")  # before this run replaces it
        self.reports, started = reports, time.time() - 1.0  # file times may lag the clock a little
        check_writable_dir(out, "--out")
        kept = (reports / "config.json").read_text() if (reports / "config.json").is_file() else None
        with rank0_first():  # rank 0 fills the scan and render caches the other ranks then read
            data = load_data(cfg.data, progress=self.progress, split=cfg.evaluation.split)
        pool, eval_set = data.pool, data.held_out
        feed = Feed(pool, Preprocess(cfg.data.transform), cfg.data.workers(),
                    pin_memory=cfg.data.pin_memory is not False)
        self.log(f"[data] {pool.name}: {len(pool)} images, {pool.num_classes} classes; "
                 f"{cfg.evaluation.split} {len(eval_set)} images, {eval_set.num_classes} held-out classes"
                 + (f"; {data.notes}" if data.notes else ""))
        try:
            models, chain, how = self.train_models(feed, eval_set)
            self.transforms = train_transforms(self, models)
        except BaseException:
            if is_main() and not self.wrote_since(started):
                self.undo_config(kept)
            raise
        report = self.evaluate(models, chain, how, feed.with_source(eval_set), data, reports)
        if cfg.evaluation.test_sets:
            report["test_sets"] = evaluate_test_sets(cfg, out / "models", list(models), reports, chain,
                                                     self.log, self.progress,
                                                     {tt.name: tt.h for tt in self.transforms})
            if is_main():
                note_test_sets(reports, report["test_sets"])
        return report

    def write_config(self) -> None:
        """Record the run's config in its report folder: the first file a run writes, once its data
        loaded and its pre-checks passed, so a run refused on bad input leaves nothing behind."""
        if is_main():
            self.reports.mkdir(parents=True, exist_ok=True)
            write_json(self.reports / "config.json", self.cfg.model_dump(mode="json"))

    def wrote_since(self, started: float) -> bool:
        """Whether the run has written a model or checkpoint file since ``started`` (time.time())."""
        models = self.out / "models"
        return models.is_dir() and any(p.is_file() and p.stat().st_mtime >= started
                                       for p in models.rglob("*"))

    def undo_config(self, kept: str | None) -> None:
        """A run that failed before it wrote any model leaves the folder as it found it: the config
        it replaced back (or none), and the folders it made removed while empty."""
        path = self.reports / "config.json"
        if kept is not None:
            write_text(path, kept)
            return
        path.unlink(missing_ok=True)
        for folder in (self.reports, self.out):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def train_models(self, feed: Feed, eval_set: DataSource
                     ) -> tuple[dict[str, LoadedModel], list[str] | None, dict[str, Any]]:
        """The benchmark: allocate the pool, train the old model on its old part, then the paragon,
        every method and the chain on its new part. Returns (models by name, chain, allocation)."""
        cfg, pool = self.cfg, feed.source
        check_inputs(cfg, feed.input_shape)
        check_identities(pool, cfg.allocation.scenario, eval_set, cfg.evaluation.gallery_per_class)
        self.write_config()
        alloc = allocate(pool.labels, cfg.allocation.scenario, cfg.allocation.ratio, cfg.allocation.seed,
                         cfg.allocation.classes)
        self.log(f"[allocation] {alloc.summary()}")
        old_set = feed.with_source(pool.subset(alloc.old_indices, alloc.old_labels))
        new_set = feed.with_source(pool.subset(alloc.new_indices, alloc.new_labels))
        # What a trained model depends on: the training pool (its source's identity and labels, not
        # its pixels), how images are preprocessed and the allocation; not the evaluation set nor
        # where the data is cached (glyphs: the installed fonts are in the render cache's key).
        data_key = {"pool": pool.fingerprint(), "images": len(pool), "preprocessing": feed.spec(),
                    "allocation": cfg.allocation.model_dump()}
        old = self.train_or_load(
            "old", old_set, cfg.old, cfg.old.train,
            lambda train: run_key({**data_key, "model": cfg.old.model_copy(update={"train": train})
                                   .model_dump(context=KEY)}),
        )
        models: dict[str, LoadedModel] = {"old": old}
        paragon = None
        if cfg.paragon:
            paragon = self.compat_model("paragon", MethodConfig(method="independent"), new_set,
                                        alloc.new_to_old, old, None, data_key)
            models["paragon"] = paragon
        for method in cfg.methods:
            models[method.display_name] = self.compat_model(
                method.display_name, method, new_set, alloc.new_to_old, old, paragon, data_key
            )
        self.trained_on = new_set, alloc.new_to_old
        chain = self.train_chain(feed, alloc, paragon, data_key, models) if cfg.chain else None
        return models, chain, alloc.summary()

    def feed_for(self, model: LoadedModel, feed: Feed) -> Feed:
        """``feed`` as ``model`` reads it: an imported model through its own preprocessing."""
        own = preprocess_of(model)
        return feed if own is None else feed.with_preprocess(own)

    def evaluate(self, models: dict[str, LoadedModel], chain: list[str] | None, how: dict[str, Any],
                 eval_feed: Feed,
                 data: LoadedData, reports: Path) -> dict[str, Any]:
        """Every model's features of the evaluation set (gathered to rank 0), then the report."""
        cfg, eval_set = self.cfg, eval_feed.source
        features = {}
        eval_labels = torch.from_numpy(eval_set.labels)
        eval_fp = eval_set.fingerprint()
        for name, model in models.items():
            if model.given is not None:
                feats = model.given[eval_fp] if is_main() else None
            else:
                share = extract_share(model.backbone.to(self.engine.device), self.feed_for(model, eval_feed),
                                      cfg.evaluation.batch_size, flip=cfg.evaluation.flip,
                                      progress=self.progress, desc=f"eval {name}", engine=self.engine)
                feats = gather_rows(share)
            if feats is None:  # another rank than 0: rank 0 evaluates and reports
                continue
            fs = FeatureSet(feats, eval_labels, {
                "model": name, "model_fingerprint": model.fingerprint,
                "compat_dims": model.meta.get("compat_dims"),
                "compat_prefixes": model.meta.get("compat_prefixes"), "layout": model.meta.get("layout"),
                "flip": cfg.evaluation.flip,
                "dataset": eval_set.name, "images_fingerprint": eval_fp,
                **{k: self.models_info[name][k] for k in ("method", "params", "train_images", "num_classes")},
            })
            fs.save(reports / "features" / f"{name}.safetensors")
            features[name] = fs
        sides = side_features(self, self.transforms, eval_feed)
        transforms: dict[str, dict[str, Any]] = {}
        if is_main() and self.transforms:
            transformed, transforms = transformed_features(self.transforms, features, sides)
            for tt in self.transforms:
                transformed[tt.name].save(reports / "features" / f"{tt.name}.safetensors")
                self.models_info[tt.name] = tt.info
            features.update(transformed)
        if not is_main():
            barrier()
            return {}
        ev = cfg.evaluation
        protocol = run_protocol(cfg, eval_set, eval_labels)
        extra = {
            "dataset": describe_held_out(cfg, eval_set) + describe_notes(data.notes),
            "allocation": how,
            "config": cfg.model_dump(mode="json"),
        }
        if data.notes:
            extra["data_notes"] = data.notes
        report = evaluate_suite(features, protocol, reports, self.models_info, extra, backfill=ev.backfill,
                                chain=chain, log=self.log, progress=self.progress,
                                train_features=TrainSample.of(self, models), transforms=transforms)
        self.log(f"[report] {reports / 'report.md'}")
        barrier()
        return report
