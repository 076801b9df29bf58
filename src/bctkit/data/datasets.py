"""Dataset configuration and loading: a training pool plus a held-out pool of evaluation identities."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from bctkit.data.glyphs import GlyphsConfig, load_glyphs
from bctkit.data.imageset import ImageSet
from bctkit.data.noise import flip_labels
from bctkit.data.synthetic import SyntheticSpec, make_synthetic
from bctkit.errors import ConfigError

Split = Literal["test", "validation"]


class SyntheticConfig(BaseModel):
    """Options of the embedded synthetic dataset (see :class:`SyntheticSpec` for their meaning)."""

    model_config = ConfigDict(extra="forbid")

    num_classes: int = Field(400, ge=2, description="identities in the training pool")
    images_per_class: int = Field(20, ge=1)
    size: int = Field(32, ge=8, le=256)
    channels: Literal[1, 3] = 1
    seed: int = 0
    noise: float = Field(0.18, ge=0)
    rotation_deg: float = Field(18.0, ge=0)
    occlusion_prob: float = Field(0.5, ge=0, le=1)
    class_detail: float = Field(0.45, ge=0)


class DataConfig(BaseModel):
    """The training pool and the evaluation identities (never used in training: open-set)."""

    model_config = ConfigDict(extra="forbid")

    dataset: Literal["synthetic", "glyphs"] = "synthetic"
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    glyphs: GlyphsConfig = Field(default_factory=GlyphsConfig)
    eval_classes: int = Field(100, ge=2)
    eval_images_per_class: int = Field(10, ge=2)
    label_noise: float = Field(0.0, ge=0, lt=1, description=(
        "share of training-pool images relabelled to a uniformly drawn other class (symmetric label "
        "noise, a robustness study); evaluation identities are never touched"))
    label_noise_seed: int = Field(0, ge=0)
    validation_classes: int = Field(0, ge=0, description=(
        "identities kept apart from training and from the test identities, with "
        "eval_images_per_class images each, for choosing settings (evaluation.split: validation) "
        "without looking at the test set"))

    @model_serializer(mode="wrap")
    def _drop_unused(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Dumps leave out the section of the dataset not in use, so that a run's key and
        config.json depend only on options that make its data (and synthetic runs keep the keys
        they had before the glyphs dataset existed)."""
        data = handler(self)
        data.pop("glyphs" if self.dataset == "synthetic" else "synthetic", None)
        if self.label_noise == 0:
            data.pop("label_noise", None)
            data.pop("label_noise_seed", None)
        if self.validation_classes == 0:
            data.pop("validation_classes", None)
        return data

    @property
    def channels(self) -> int:
        return self.synthetic.channels if self.dataset == "synthetic" else 1

    @property
    def image_size(self) -> int:
        return self.synthetic.size if self.dataset == "synthetic" else self.glyphs.size


def load_datasets(cfg: DataConfig, progress: bool = True, split: Split = "test") -> tuple[ImageSet, ImageSet]:
    """(training pool, evaluation set), both labelled from 0; no evaluation identity is in the pool.
    The evaluation set is the test identities, or with ``split="validation"`` the
    ``validation_classes`` identities that are neither training nor test identities (for choosing
    settings). Synthetic: held-out identities are generated after the pool's (test first, then
    validation). Glyphs: they are characters the pool does not use (rendered on first use, then
    read from the cache). ``label_noise`` relabels a share of the pool's images
    (:func:`bctkit.data.noise.flip_labels`); held-out identities are never touched."""
    if split == "validation" and cfg.validation_classes < 2:
        raise ConfigError(f"data.validation_classes={cfg.validation_classes}: the validation split needs "
                          "at least 2 identities")
    pool, held_out = _load_clean(cfg, progress, split)
    if cfg.label_noise == 0:
        return pool, held_out
    noisy, flipped = flip_labels(pool.labels, cfg.label_noise, cfg.label_noise_seed, pool.num_classes)
    name = f"{pool.name}, {len(flipped)} of {len(pool)} labels flipped (seed {cfg.label_noise_seed})"
    return ImageSet(pool.images, noisy, name), held_out


def _load_clean(cfg: DataConfig, progress: bool, split: Split) -> tuple[ImageSet, ImageSet]:
    if cfg.dataset == "glyphs":
        return load_glyphs(cfg.glyphs, cfg.eval_classes, cfg.eval_images_per_class, progress=progress,
                           validation_classes=cfg.validation_classes, split=split)
    syn = cfg.synthetic
    known = {f.name for f in fields(SyntheticSpec)}
    common = {k: v for k, v in syn.model_dump().items() if k in known}
    pool = make_synthetic(SyntheticSpec(**common))
    test = split == "test"
    held_out = make_synthetic(
        SyntheticSpec(
            **{**common, "num_classes": cfg.eval_classes if test else cfg.validation_classes,
               "images_per_class": cfg.eval_images_per_class},
            first_class=syn.num_classes if test else syn.num_classes + cfg.eval_classes,
        )
    )
    return (
        ImageSet(pool.images, pool.labels, f"synthetic train pool (seed {syn.seed})"),
        ImageSet(held_out.images, held_out.labels, f"synthetic {'eval' if test else split} "
                                                   f"(seed {syn.seed})"),
    )
