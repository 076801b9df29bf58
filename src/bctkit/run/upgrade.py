"""Upgrade mode: the old model is the one a user runs today (a checkpoint, or only its features), so
there is no allocation re-split: every new model trains on all of the given training data against
it, and the evaluation's old gallery comes from that model or its given features."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from bctkit.data.screening import check_identities
from bctkit.data.sources.base import DataSource
from bctkit.data.transforms import Preprocess
from bctkit.engine.distributed import barrier, is_main
from bctkit.engine.loader import Feed
from bctkit.errors import ConfigError
from bctkit.models.store import LoadedModel, load_model, save_model
from bctkit.oldside.external import (
    checkpoint_backbone,
    checkpoint_meta,
    classifier_head,
    features_model,
    new_to_old_rows,
    old_transform,
)
from bctkit.run.benchmark import Run
from bctkit.run.config import MethodConfig
from bctkit.run.prechecks import check_inputs


def renumbered(feed: Feed) -> tuple[Feed, np.ndarray]:
    """The training data with its classes numbered 0..n-1 in order of class id, as the benchmark's
    allocation numbers them, and each class's dataset id. A seeded test split leaves gaps in the
    ids (the held-out identities), which the new models' classifier and the old-row map must not
    have; without gaps the data is returned as it is."""
    pool = feed.source
    ids, dense = np.unique(pool.labels, return_inverse=True)
    if np.array_equal(ids, np.arange(len(ids))):
        return feed, ids
    view = pool.subset(None, dense.astype(np.int64))
    view.name = pool.name
    return feed.with_source(view), ids


class UpgradeRun(Run):
    """A run whose old model is given (``old.source: checkpoint | features``)."""

    def import_old(self, feed: Feed, eval_set: DataSource, ids: np.ndarray) -> tuple[LoadedModel, np.ndarray]:
        """The old model (a checkpoint saved into the run as models/old, or given features) and each
        training class's row in its classifier (-1: none); ``ids``: each class's dataset class id."""
        old = self.cfg.old
        head = classifier_head(old, old.backbone.output_dim)
        new_to_old = new_to_old_rows(old, head, feed.source, ids)
        if old.source == "features":
            model = features_model(old, head, feed.source, eval_set)
            self.log(f"[old] given features {old.features.train if old.features else ''} "
                     f"({model.output_dim} dims), fingerprint {model.fingerprint}")
        else:
            old_feed = feed.with_preprocess(Preprocess(old_transform(old, self.cfg.data.transform)))
            backbone = checkpoint_backbone(old, old_feed.input_shape)
            path = self.out / "models" / "old" / "model.safetensors"
            if is_main():
                save_model(path, backbone, head, old.head, checkpoint_meta(old, old_feed.spec()))
            barrier()
            model = load_model(path)
            self.log(f"[old] imported {old.weights} ({old.backbone.arch}, {model.output_dim} dims), "
                     f"fingerprint {model.fingerprint}")
        self._record("old", model)
        return model, new_to_old

    def train_models(self, feed: Feed, eval_set: DataSource
                     ) -> tuple[dict[str, LoadedModel], list[str] | None, dict[str, Any]]:
        cfg, pool = self.cfg, feed.source
        if cfg.chain:
            raise ConfigError("chain: with an old model given from outside, train one upgrade per run "
                              "(the next run's old.source: checkpoint is this run's new model)")
        check_inputs(cfg, feed.input_shape, sides=("new",))
        check_identities(pool, "upgrade", eval_set, cfg.evaluation.gallery_per_class)
        self.write_config()
        feed, ids = renumbered(feed)
        pool = feed.source
        old, new_to_old = self.import_old(feed, eval_set, ids)
        source = (f"checkpoint {cfg.old.weights}" if cfg.old.source == "checkpoint"
                  else f"features {cfg.old.features.train if cfg.old.features else ''}")
        how = {"scenario": "upgrade", "old": source, "new_images": len(pool), "new_classes": pool.num_classes,
               "shared_classes": int((new_to_old >= 0).sum())}
        self.log(f"[upgrade] the new models train on all {len(pool)} training images ({pool.num_classes} "
                 f"classes, {how['shared_classes']} of them in the old classifier); old model: {source}")
        head_rows = b"" if old.head is None else old.head.weight.detach().numpy().tobytes()
        data_key: dict[str, Any] = {
            "pool": pool.fingerprint(), "images": len(pool), "preprocessing": feed.spec(),
            "upgrade": {"old_classifier": hashlib.sha256(head_rows).hexdigest()[:16],
                        "new_to_old": hashlib.sha256(new_to_old.tobytes()).hexdigest()[:16]},
        }
        models: dict[str, LoadedModel] = {"old": old}
        paragon = None
        if cfg.paragon:
            paragon = self.compat_model("paragon", MethodConfig(method="independent"), feed, new_to_old, old,
                                        None, data_key)
            models["paragon"] = paragon
        for method in cfg.methods:
            models[method.display_name] = self.compat_model(method.display_name, method, feed, new_to_old,
                                                            old, paragon, data_key)
        self.trained_on = feed, new_to_old
        return models, None, how

