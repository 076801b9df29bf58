"""Typed training options: optimiser, learning-rate schedule, epochs, clipping, seed, augmentation."""

from __future__ import annotations

import re
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

from bctkit.models.config import BackboneConfig
from bctkit.models.heads import HeadConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerConfig(_Strict):
    """``lr_batch``: the global batch size ``lr`` is given for; each step then uses
    ``lr * train.batch_size / lr_batch`` (arcface_torch's rule with 512). None: ``lr`` as given."""

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    lr_batch: int | None = Field(None, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(_Strict):
    """Per-step learning-rate factor. multistep: gamma at each milestone epoch; cosine: linear
    warm-up then half cosine to min_factor; poly: (1 - t/T) ** power (after warm-up)."""

    name: Literal["constant", "multistep", "cosine", "poly"] = "cosine"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)
    warmup_epochs: float = Field(0.0, ge=0)
    power: float = Field(2.0, gt=0)
    min_factor: float = Field(0.0, ge=0, le=1)


class AugmentConfig(_Strict):
    """Train-time augmentation, applied to each batch in the data loader after the data's
    preprocessing, seeded by (train seed, epoch, step): ``hflip`` mirrors each image with
    probability 1/2, ``crop_pad`` takes a random crop of the image's size from a copy padded by that
    many pixels (edges repeated). Off by default: synthetic images already carry random nuisance,
    and cached old features are computed from un-augmented images."""

    hflip: bool = False
    crop_pad: int = Field(0, ge=0)


class PartialFCConfig(_Strict):
    """insightface's Partial FC for very many identities. ``shard``: under several processes each
    rank holds a contiguous block of the classifier's rows and the softmax is computed across ranks
    (exactly the replicated head's loss; saved as one matrix). ``sample_rate`` < 1: each step uses
    every class present in the global batch plus random others up to that share of the classes
    (a cosine-margin head only)."""

    shard: bool = False
    sample_rate: float = Field(1.0, gt=0, le=1)

    @property
    def active(self) -> bool:
        return self.shard or self.sample_rate < 1


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    grad_clip: float | None = Field(None, gt=0)
    seed: int = 666
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    device: str = Field("auto", description=(
        "auto (CUDA when present, the GPU of each process's LOCAL_RANK under torchrun), cpu, cuda, "
        "cuda:N or mps; not part of a run's key: a run resumes on another device"))
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description=(
        "autocast dtype of the backbone's forward pass (heads and compatibility terms stay float32); "
        "fp16 adds a gradient scaler"))
    batchnorm: Literal["global", "local"] = Field("global", description=(
        "under several processes: 'global' normalises by the whole global batch (one small all-reduce "
        "per BatchNorm layer; the steps equal one process's), 'local' by each process's share "
        "(insightface's arcface_torch; faster where communication is slow, not equal to one process)"))
    partial_fc: PartialFCConfig = Field(default_factory=PartialFCConfig)
    checkpoint_every: int | None = Field(None, ge=1, description=(
        "also write the checkpoint every N steps inside an epoch, so an interrupted long epoch "
        "resumes where it stopped (the checkpoint after every epoch is always written); not part of "
        "a run's key, since it does not change the result"))

    @property
    def base_lr(self) -> float:
        """The learning rate before the schedule's factor: ``optimizer.lr``, scaled to the batch
        when ``optimizer.lr_batch`` is set."""
        opt = self.optimizer
        return opt.lr if opt.lr_batch is None else opt.lr * self.batch_size / opt.lr_batch

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        """Dumps leave out ``checkpoint_every`` when unset, ``device`` when auto and ``precision`` when
        fp32 (so keys of runs made before these options are unchanged); run keys (context
        ``{"key": True}``) always leave out ``checkpoint_every`` and ``device``: they do not change
        what training produces beyond floating-point rounding."""
        data = handler(self)
        key = (info.context or {}).get("key")
        opt = data.get("optimizer")
        if isinstance(opt, dict) and opt.get("lr_batch") is None:
            opt.pop("lr_batch", None)
        if self.checkpoint_every is None or key:
            data.pop("checkpoint_every", None)
        if self.device == "auto" or key:
            data.pop("device", None)
        if self.precision == "fp32":
            data.pop("precision", None)
        if self.batchnorm == "global":
            data.pop("batchnorm", None)
        pfc = data.get("partial_fc")
        if isinstance(pfc, dict):
            if key:  # sharding computes the same loss; sampling changes it
                pfc.pop("shard", None)
            if not self.partial_fc.active or pfc == {"sample_rate": 1.0}:
                data.pop("partial_fc")
        return data

    @field_validator("device")
    @classmethod
    def _device_spelling(cls, v: str) -> str:
        """The spelling is checked at load time; whether the device exists, when the run starts."""
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v.strip().lower()):
            raise ValueError(f"{v!r}; expected auto, cpu, cuda, cuda:N or mps")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        sch = self.schedule
        if sch.warmup_epochs >= self.epochs:
            raise ValueError(
                f"schedule.warmup_epochs ({sch.warmup_epochs}) must be below epochs ({self.epochs})"
            )
        if sch.name == "multistep":
            if not sch.milestones:
                raise ValueError("schedule.milestones is required for the multistep schedule")
            if sorted(sch.milestones) != sch.milestones or sch.milestones[-1] >= self.epochs:
                raise ValueError(
                    f"schedule.milestones must be increasing epochs below {self.epochs}, "
                    f"got {sch.milestones}"
                )
        elif sch.milestones:
            raise ValueError(f"schedule.milestones given but schedule is {sch.name!r}")
        return self


MARGIN_HEADS = ("arcface", "cosface")
MARGIN_CLIP = 5.0  # arcface_torch: clip_grad_norm_(backbone.parameters(), 5)
MARGIN_LR_BATCH = 512  # arcface_torch: lr = cfg.lr / 512 * batch_size * world_size


def margin_defaults(head: HeadConfig, train: TrainConfig) -> TrainConfig:
    """``train`` with arcface_torch's safeguards filled in where the config left them unset, for a
    margin head (ArcFace, CosFace): a margin at s 64 on a randomly initialised network makes the
    first steps' loss and gradients large, and without warm-up and clipping training can diverge
    or collapse. Unset ``grad_clip`` becomes 5; unset ``schedule.warmup_epochs`` becomes 1 (half an
    epoch for a one-epoch run; not a share of the epochs, so a larger ``epochs`` changes nothing
    else); an unset ``optimizer.lr`` (with no ``lr_batch``) becomes 0.1 per 512
    images of global batch. Options the config sets, even to null or 0, are kept as given."""
    if head.type not in MARGIN_HEADS:
        return train
    update: dict[str, Any] = {}
    if "grad_clip" not in train.model_fields_set:
        update["grad_clip"] = MARGIN_CLIP
    sch, opt = train.schedule, train.optimizer
    if "schedule" not in train.model_fields_set or "warmup_epochs" not in sch.model_fields_set:
        update["schedule"] = sch.model_copy(update={"warmup_epochs": 1.0 if train.epochs > 1 else 0.5})
    if "optimizer" not in train.model_fields_set or not {"lr", "lr_batch"} & opt.model_fields_set:
        update["optimizer"] = opt.model_copy(update={"lr_batch": MARGIN_LR_BATCH})
    if not update:
        return train
    # Validated again (and marked as set), so a dump reloads to the same values.
    return TrainConfig.model_validate({**train.model_dump(), **{k: (v.model_dump() if isinstance(v, BaseModel)
                                                                     else v) for k, v in update.items()}})


class ModelConfig(_Strict):
    """What a trained model is: its backbone, its classification head and how it is trained (with
    :func:`margin_defaults` for a margin head)."""

    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _margin_defaults(self) -> ModelConfig:
        train = margin_defaults(self.head, self.train)
        if train is not self.train:
            object.__setattr__(self, "train", train)
        return self
