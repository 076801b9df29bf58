"""Dataset configuration and loading: a training pool plus a held-out pool of evaluation identities."""

from __future__ import annotations

from dataclasses import fields
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bctkit.data.imageset import ImageSet
from bctkit.data.synthetic import SyntheticSpec, make_synthetic


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

    dataset: Literal["synthetic"] = "synthetic"
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    eval_classes: int = Field(100, ge=2)
    eval_images_per_class: int = Field(10, ge=2)

    @property
    def channels(self) -> int:
        return self.synthetic.channels

    @property
    def image_size(self) -> int:
        return self.synthetic.size


def load_datasets(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    """(training pool, evaluation set). Evaluation identities are generated after the pool's, so
    they are distinct classes; both are relabelled from 0."""
    syn = cfg.synthetic
    known = {f.name for f in fields(SyntheticSpec)}
    common = {k: v for k, v in syn.model_dump().items() if k in known}
    pool = make_synthetic(SyntheticSpec(**common))
    held_out = make_synthetic(
        SyntheticSpec(
            **{**common, "num_classes": cfg.eval_classes,
               "images_per_class": cfg.eval_images_per_class},
            first_class=syn.num_classes,
        )
    )
    return (
        ImageSet(pool.images, pool.labels, f"synthetic train pool (seed {syn.seed})"),
        ImageSet(held_out.images, held_out.labels, f"synthetic eval (seed {syn.seed})"),
    )
