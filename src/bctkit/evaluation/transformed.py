"""A transformed gallery as a model's features: h applied to the old model's features of a test
set's images, named and fingerprinted as the gallery version ``bctkit gallery transform`` writes
(h's fingerprint composed with the old model's). Shared by a run's own evaluation and its test sets."""

from __future__ import annotations

from typing import Any

import torch

from bctkit.features import FeatureSet
from bctkit.models.transformation import LoadedTransformation

__all__ = ["method_of", "transform_meta", "transformed_set"]


def method_of(h: LoadedTransformation) -> str:
    """The method a report names h by: ``fastfill`` (with uncertainty) or ``fct``."""
    return "fastfill" if h.config.uncertainty else "fct"


def transform_meta(h: LoadedTransformation) -> dict[str, Any]:
    """What a report and a feature file say of h: its fingerprint, the old model's, its target's."""
    return {"fingerprint": h.fingerprint, "old_fingerprint": h.old_fingerprint,
            "target": h.meta.get("target"), "target_fingerprint": h.meta.get("new_fingerprint")}


def transformed_set(name: str, h: LoadedTransformation, old: FeatureSet, target: FeatureSet,
                    meta: dict[str, Any] | None = None, side: torch.Tensor | None = None
                    ) -> tuple[FeatureSet, torch.Tensor | None]:
    """(h(old) as the FeatureSet of model ``name``, h's log sigma^2 per image or None); ``meta``:
    more metadata (method, params, ...); ``side``: the side model's features of the same images."""
    y, log_var = h.apply(old.feats, side)
    fs = FeatureSet(torch.from_numpy(y), old.labels, keys=old.keys, meta={
        **{k: v for k, v in target.meta.items() if k in ("dataset", "images_fingerprint", "flip", "layout")},
        **(meta or {}),
        "model": name, "model_fingerprint": h.version, "compat_dims": None, "compat_prefixes": None,
        "transform": transform_meta(h),
    })
    return fs, None if log_var is None else torch.from_numpy(log_var)
