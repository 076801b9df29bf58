"""Where the old model comes from: trained by the run (the benchmark), a checkpoint of the model a
user runs in production, or only that model's precomputed features (upgrade mode)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from bctkit.data.transforms import TransformConfig
from bctkit.errors import ConfigError
from bctkit.losses import validate_params
from bctkit.losses.base import method_class
from bctkit.training.config import ModelConfig

OldSource = Literal["train", "checkpoint", "features"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifierConfig(_Strict):
    """The old model's classifier: a [classes, d] matrix (.npy, .safetensors, or a .pt/.pth state
    dict with a ``weight`` tensor), or arcface_torch's Partial FC shards (``softmax_fc_gpu_<rank>.pt``)
    listed in rank order, merged by their contiguous class ranges. ``label_map``: for each class of
    the training data, its row in the classifier (or none): ``identity`` (the same class ids, same
    count), or a JSON file, either a list (one entry per class id: a row or null) or an object
    {class name: row}; classes it leaves out are new to the old model. Class ids are the dataset's,
    held-out test identities included. ``num_classes``: the
    classifier's class count, checked against the shards (a missing last shard is otherwise
    indistinguishable from a smaller classifier)."""

    weights: list[str] = Field(min_length=1)
    label_map: str
    num_classes: int | None = Field(None, ge=1)

    @field_validator("weights", mode="before")
    @classmethod
    def _one(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class GivenFeaturesConfig(_Strict):
    """Precomputed old features: ``train`` for the training images, ``eval`` for the evaluation
    images (the old gallery and the old model's own queries). Each is a .npy [N, d] in the data's
    order, a .safetensors with a ``features`` tensor in that order, or a .npz with ``features`` and
    optionally ``keys`` (each row's image path, as the data source names it) to match by path."""

    train: str
    eval: str


class OldConfig(ModelConfig):
    """The old model. ``source: train`` (default): trained by the run on the allocation's old part.
    ``checkpoint``: ``backbone`` + ``weights`` (+ ``transform``, its preprocessing when it differs
    from ``data.transform``, + optional ``classifier`` with ``head`` its form). ``features``:
    ``features`` (+ optional ``classifier``); ``backbone.embedding_dim`` states their dimension."""

    source: OldSource = "train"
    weights: str | None = Field(None, description="backbone weights: .safetensors, or a .pt/.pth state dict")
    transform: TransformConfig | None = None
    classifier: ClassifierConfig | None = None
    features: GivenFeaturesConfig | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        """A trained old model dumps as before upgrade mode existed (same run keys and config files)."""
        data = handler(self)
        if self.source == "train":
            data.pop("source", None)
        for name in ("weights", "transform", "classifier", "features"):
            if data.get(name, 0) is None:
                data.pop(name)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> OldConfig:
        options = ("weights", "transform", "classifier", "features")
        given = [n for n in options if getattr(self, n) is not None]
        wanted = {"train": set(), "checkpoint": {"weights", "transform", "classifier"},
                  "features": {"features", "classifier"}}[self.source]
        extra = [n for n in given if n not in wanted]
        if extra:
            raise ValueError(f"old.{extra[0]} does not apply to old.source={self.source}")
        if self.source == "checkpoint" and self.weights is None:
            raise ValueError("old.source=checkpoint needs old.weights (the backbone's state dict file)")
        if self.source == "features" and self.features is None:
            raise ValueError("old.source=features needs old.features.train and old.features.eval")
        if self.source != "train" and self.backbone.bt2 is not None:
            raise ValueError("old.backbone.bt2: an external old model is a plain embedding")
        return self

    @property
    def external(self) -> bool:
        """True in upgrade mode: the old model (or its features) is given, not trained here."""
        return self.source != "train"


def check_upgrade(cfg: Any) -> None:
    """Options of a RunConfig that conflict with where its old model comes from (load-time errors)."""
    old = cfg.old
    if not cfg.paragon:
        for i, m in enumerate(cfg.methods):
            if method_class(m.method).needs_paragon_features:
                raise ValueError(f"methods.{i}: {m.method} learns from the paragon's features; "
                                 "set paragon: true")
    if not old.external:
        return
    what = f"old.source={old.source} trains the new model on all of the given training data"
    if "allocation" in cfg.model_fields_set:
        raise ValueError(f"allocation: {what}; there is no old/new re-split (remove allocation)")
    if cfg.scenario_overrides:
        raise ValueError(f"scenario_overrides: {what}; there are no allocations to override")
    for i, v in enumerate(cfg.chain):
        if v.ratio is not None:
            raise ValueError(f"chain.{i}.ratio: {what}; chain versions train on it too (remove ratio)")
    if old.source == "features":
        for field, on in (("evaluation.flip", cfg.evaluation.flip), ("cache.flip", cfg.cache.flip)):
            if on:
                raise ValueError(f"{field}: the flip test needs the old network, but old.source=features "
                                 "gives only its features; use old.source=checkpoint or set it false")


def check_old_classifier(method: Any, old: OldConfig) -> None:
    """A method that reads the old classifier needs one when the old model is given from outside."""
    if not old.external or old.classifier is not None:
        return
    term = method_class(method.method)(validate_params(method.method, method.params))
    if term.uses_old_classifier():
        hint = " or new_classes: synthesize_all" if method.method == "bct" else ""
        raise ConfigError(f"{method.display_name} needs the old model's classifier; give old.classifier "
                          f"(weights and label_map){hint}")
