"""The old model of an upgrade, given from outside: a checkpoint of the production network (its
architecture, weights and preprocessing) or only its features, each with an optional classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bctkit.data.sources.base import DataSource
from bctkit.data.transforms import Preprocess, TransformConfig
from bctkit.errors import ConfigError
from bctkit.models.adapters import AdaptedBackbone
from bctkit.models.factory import build_backbone
from bctkit.models.heads import Head, build_head
from bctkit.models.store import LoadedModel, freeze
from bctkit.models.weights import load_backbone_weights
from bctkit.oldside.classifier import class_rows, load_classifier
from bctkit.oldside.config import OldConfig
from bctkit.oldside.given import features_fingerprint, given_features


def old_transform(old: OldConfig, data_transform: TransformConfig) -> TransformConfig:
    """How the old model reads images: its own ``old.transform``, else the data's."""
    return old.transform or data_transform


def classifier_head(old: OldConfig, dim: int) -> Head | None:
    """The old classifier as a frozen head of ``old.head``'s form, or None without one."""
    if old.classifier is None:
        return None
    weight = load_classifier(old.classifier, dim)
    head = build_head(old.head, dim, len(weight))
    with torch.no_grad():
        head.weight.copy_(weight)
    return freeze(head)


def new_to_old_rows(old: OldConfig, head: Head | None, source: DataSource, ids: np.ndarray) -> np.ndarray:
    """Each training class's row in the old classifier (-1: new to it; all -1 without one); ``ids``:
    the dataset class id of each training class (``source`` is renumbered 0..n-1)."""
    if head is None or old.classifier is None:
        return np.full(len(ids), -1, dtype=np.int64)
    return class_rows(old.classifier.label_map, source, head.num_classes, ids)


def checkpoint_backbone(old: OldConfig, input_shape: tuple[int, int, int]) -> nn.Module:
    """The production network, built from ``old.backbone`` and loaded from ``old.weights`` (strict
    keys, ``weights_only``), frozen; its input must be what ``old.transform`` yields."""
    bb = old.backbone
    want = tuple(bb.input_shape)
    if want != tuple(input_shape):
        c, h, w = input_shape
        raise ConfigError(
            f"old.backbone takes {'x'.join(map(str, want))} images (C x H x W) but old.transform gives "
            f"{c}x{h}x{w}; set old.transform (resize, crop, color) to the old model's preprocessing")
    backbone = build_backbone(bb)
    # A timm: / python: network sits at ``.model``; its own state dict has no such prefix.
    target = backbone.model if isinstance(backbone, AdaptedBackbone) else backbone
    load_backbone_weights(target, Path(str(old.weights)))
    return freeze(backbone)


def checkpoint_meta(old: OldConfig, spec: dict[str, Any]) -> dict[str, Any]:
    """Metadata of an imported old model (saved with it in the run directory)."""
    return {
        "name": "old", "source": "checkpoint", "weights": str(old.weights),
        "classifier": None if old.classifier is None else old.classifier.model_dump(),
        "method": None, "params": None, "train": None, "train_images": None, "train_data": None,
        "preprocessing": spec, "train_seconds": None, "compat_dims": None, "compat_prefixes": None,
        "layout": None, "compatible_with": None, "history": [],
    }


def features_model(old: OldConfig, head: Head | None, train: DataSource, evaluation: DataSource
                   ) -> LoadedModel:
    """The old model known only by its given features of the training and evaluation images."""
    assert old.features is not None
    dim = old.backbone.embedding_dim
    train_feats = given_features(old.features.train, train, dim, "training")
    eval_feats = given_features(old.features.eval, evaluation, dim, "evaluation")
    meta = {
        "name": "old", "source": "features", "fingerprint": features_fingerprint(train_feats, eval_feats),
        "features": old.features.model_dump(), "output_dim": dim, "backbone": None,
        "head": old.head.model_dump(), "num_classes": 0 if head is None else head.num_classes,
        "method": None, "params": None, "train": None, "train_images": None, "train_seconds": None,
        "compat_dims": None, "compat_prefixes": None, "layout": None, "history": [],
    }
    given = {train.fingerprint(): train_feats, evaluation.fingerprint(): eval_feats}
    return LoadedModel(None, head, meta, given)


def preprocess_of(model: LoadedModel) -> Preprocess | None:
    """The preprocessing an imported model was saved with (None: it reads images as the run does)."""
    if model.meta.get("source") != "checkpoint":
        return None
    return Preprocess.from_spec(model.meta["preprocessing"])
