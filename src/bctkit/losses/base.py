"""The one interface every compatibility method implements, and the method registry.

A method is a :class:`CompatibilityTerm`: it is set up once with a :class:`CompatContext` (frozen old
model and classifier, cached old features, label map) and then, every training step, sees a
:class:`CompatBatch` (new features with gradient, cached old features of the same images, labels)
and returns a :class:`TermOutput` (scalar loss plus logged parts). The base classification loss is
the trainer's; a method that must change what the base head sees (MixBCT) overrides
:meth:`CompatibilityTerm.mix`. Adding a method = one small file that subclasses this and registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from bctkit.errors import ConfigError
from bctkit.models.config import BackboneConfig
from bctkit.models.heads import Head

if TYPE_CHECKING:
    from bctkit.engine.loader import Feed


class TermParams(BaseModel):
    """Options of a method; subclasses declare fields. Unknown options are errors at load time."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class CompatContext:
    """What a term may use, fixed for the whole training run. Old modules are frozen (no grad)."""

    old_embedding_dim: int
    new_embedding_dim: int
    num_new_classes: int
    new_to_old: torch.Tensor
    train_labels: torch.Tensor
    old_train_feats: torch.Tensor | None = None
    old_model: nn.Module | None = None
    old_head: Head | None = None
    train_images: Feed | np.ndarray | None = None  # the training images, for terms that embed them
    paragon_train_feats: torch.Tensor | None = None


@dataclass
class CompatBatch:
    """One training step's view. ``new_feats`` is the stored embedding; ``base_feats`` what the base
    head classifies (the same tensor except for models that widen their embedding, BT^2);
    ``old_feats`` are cached old-model features of the same images; ``step`` is the global
    optimisation step (0-based), for seeded per-step randomness.

    Under several processes a rank holds rows ``offset``.. of the step's global batch, whose indices
    are ``global_index`` (None or equal to ``index`` in one process). The trainer averages each
    rank's loss over the ranks (gradients through DDP), so a per-sample term returns the mean over its
    rows as usual; a term coupled across the batch (in-batch negatives, counts, a random choice of
    rows) uses ``global_index`` with the context's per-image tensors, or
    :func:`bctkit.engine.distributed.gather_with_grad`, so that the mean over ranks equals its value
    on the whole batch."""

    new_feats: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    epoch: int
    step: int = 0
    old_feats: torch.Tensor | None = None
    old_labels: torch.Tensor | None = None
    base_feats: torch.Tensor | None = None
    paragon_feats: torch.Tensor | None = None
    global_index: torch.Tensor | None = None
    offset: int = 0

    @property
    def whole_index(self) -> torch.Tensor:
        """Indices of the step's whole (global) batch; this rank's are ``[offset, offset + len(index))``."""
        return self.index if self.global_index is None else self.global_index

    @property
    def share(self) -> float:
        """This rank's rows as a fraction of the global batch (1 in one process)."""
        return len(self.index) / len(self.whole_index)


@dataclass
class TermOutput:
    """The term's scalar loss (already weighted) and named parts for logging."""

    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


class CompatibilityTerm(nn.Module):
    """Base class of compatibility methods (see module docstring)."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[TermParams]] = TermParams
    needs_old_features: ClassVar[bool] = False
    # True: the term also needs the independently trained new model's (paragon's) cached features
    # of the training images (BT^2's third target).
    needs_paragon_features: ClassVar[bool] = False
    # True: the term works on the first d_o coordinates of the new embedding (BCT's rule), so it
    # needs d_n >= d_o and cross tests compare f[:d_o] when d_n > d_o.
    aligns_leading_dims: ClassVar[bool] = False

    def __init__(self, params: TermParams) -> None:
        super().__init__()
        self.params = params

    def check_dims(self, old_dim: int, new_dim: int) -> None:
        """Raise ConfigError when this method cannot work with these embedding sizes."""
        if self.aligns_leading_dims and new_dim < old_dim:
            raise ConfigError(
                f"{self.name}: new embedding_dim {new_dim} < old embedding_dim {old_dim}; "
                "the new model needs at least the old model's dimensions"
            )

    def check_train(self, epochs: int) -> None:
        """Raise ConfigError when the options conflict with a training run of ``epochs`` epochs."""

    def compatible_dims(self, old_dim: int, new_dim: int) -> int | None:
        """How many leading coordinates of the new embedding are compared with the old model's
        in cross tests (None: the whole embedding, which then must have the old size)."""
        return old_dim if self.aligns_leading_dims and new_dim > old_dim else None

    def backbone_config(self, cfg: BackboneConfig, old_dim: int) -> BackboneConfig:
        """The architecture this method trains, from the run's new backbone (unchanged unless the
        method widens the model, as BT^2 does)."""
        return cfg

    def uses_old_classifier(self) -> bool:
        """Whether these options need the old model's classifier (not only its features)."""
        return False

    def setup(self, ctx: CompatContext) -> None:
        """Called once before training, with the frozen old side."""
        self.ctx = ctx

    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        """Hook for methods that rebuild state during training (e.g. prototypes)."""

    def mix(self, feats: torch.Tensor, batch: CompatBatch) -> torch.Tensor:
        """Features the base head is trained on; the identity unless the method mixes."""
        return feats

    def forward(self, batch: CompatBatch) -> TermOutput:
        raise NotImplementedError


_REGISTRY: dict[str, type[CompatibilityTerm]] = {}
T = TypeVar("T", bound=type[CompatibilityTerm])


def register(cls: T) -> T:
    """Class decorator: make a method available by its ``name`` in configs."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"bad or duplicate method name {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(method: str) -> type[CompatibilityTerm]:
    try:
        return _REGISTRY[method]
    except KeyError:
        raise ConfigError(
            f"unknown method {method!r}; expected one of {available_methods()}"
        ) from None


def validate_params(method: str, params: dict[str, Any]) -> TermParams:
    """Validate ``params`` against the method's options; a one-line ConfigError otherwise."""
    cls = method_class(method)
    try:
        return cls.Params(**params)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"method {method!r} option {loc!r}: {err['msg']}") from None


def build_term(method: str, params: dict[str, Any]) -> CompatibilityTerm:
    """Instantiate a registered method with validated options."""
    return method_class(method)(validate_params(method, params))


