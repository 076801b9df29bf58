"""The five data allocations of UniBCT (methods.md, "Data allocations")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from bctkit.errors import DataError

Scenario = Literal["extended-data", "open-data", "extended-class", "open-class", "identical-data"]
SCENARIOS: tuple[str, ...] = get_args(Scenario)
ClassOrder = Literal["random", "first"]
"""How a class split chooses its classes: a seeded random draw (UniBCT's allocations), or the first
ones in the dataset's class order (BT^2's and BCT's old model: CIFAR-100's classes 0-49, ImageNet's
first 500 synsets)."""


@dataclass(frozen=True)
class Allocation:
    """Old and new training sets as indices into the pool, with their relabelled class ids.

    ``old_labels[i]`` is the 0-based old label of pool item ``old_indices[i]`` (likewise new);
    ``old_classes[k]`` / ``new_classes[k]`` is the pool class id of old / new label ``k``;
    ``new_to_old[k]`` is the old label of new class ``k``, or -1 when the old model never saw it.
    """

    scenario: str
    ratio: float
    seed: int
    class_order: str
    old_indices: np.ndarray
    new_indices: np.ndarray
    old_labels: np.ndarray
    new_labels: np.ndarray
    old_classes: np.ndarray
    new_classes: np.ndarray
    new_to_old: np.ndarray

    @property
    def num_old_classes(self) -> int:
        return len(self.old_classes)

    @property
    def num_new_classes(self) -> int:
        return len(self.new_classes)

    def summary(self) -> dict[str, int | float | str]:
        """Sizes for reports."""
        return {
            "scenario": self.scenario,
            "ratio": self.ratio,
            "seed": self.seed,
            **({"classes": "first in dataset order"} if self.class_order == "first" else {}),
            "old_images": len(self.old_indices),
            "old_classes": self.num_old_classes,
            "new_images": len(self.new_indices),
            "new_classes": self.num_new_classes,
            "shared_classes": int((self.new_to_old >= 0).sum()),
            "shared_images": int(np.isin(self.new_indices, self.old_indices).sum()),
        }


def class_split(labels: np.ndarray, ratio: float, rng: np.random.Generator, order: str = "random"
                ) -> np.ndarray:
    """Boolean mask over pool items: True for ``ratio`` of the class ids, a seeded random draw or
    (``order="first"``) the lowest ids, i.e. the first classes in the dataset's order."""
    classes = np.unique(labels)
    k = min(max(1, int(np.floor(ratio * len(classes)))), len(classes) - 1)
    chosen = classes[:k] if order == "first" else rng.permutation(classes)[:k]
    return np.isin(labels, chosen)


def data_split(labels: np.ndarray, ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Masks (ratio part, rest) over pool items: inside every class floor(ratio n_c), at least one,
    images go to the ratio part; a class with a single image belongs to both parts."""
    order = np.lexsort((rng.random(len(labels)), labels))
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    counts = np.diff(np.r_[starts, len(labels)])
    rank = np.arange(len(labels)) - np.repeat(starts, counts)
    take = np.maximum(1, np.floor(ratio * counts).astype(np.int64))
    in_part = np.empty(len(labels), dtype=bool)
    in_part[order] = rank < np.repeat(take, counts)
    singleton = np.zeros(len(labels), dtype=bool)
    singleton[order] = np.repeat(counts == 1, counts)
    return in_part, ~in_part | singleton


def _relabel(labels: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    classes, new = np.unique(labels[indices], return_inverse=True)
    return classes, new.astype(np.int64)


def label_map(new_classes: np.ndarray, old_classes: np.ndarray) -> np.ndarray:
    """For each of ``new_classes`` (sorted pool class ids) its position in ``old_classes`` (sorted),
    or -1 where the old side never saw that class."""
    pos = np.searchsorted(old_classes, new_classes).clip(max=len(old_classes) - 1)
    return np.where(old_classes[pos] == new_classes, pos, -1).astype(np.int64)


def allocate(
    labels: np.ndarray, scenario: str, ratio: float = 0.3, seed: int = 666, class_order: str = "random"
) -> Allocation:
    """Split a labelled pool into old and new training sets for ``scenario``.

    Class split: floor(ratio * C) class ids (at least one, at most C - 1) are "30 %-class", drawn
    at random (seeded) or, with ``class_order="first"``, the lowest ids (the dataset's first classes:
    BT^2's 50 of CIFAR-100's 100). Data split: inside every class floor(ratio * n_c) images, at least one, are
    "30 %-data"; a singleton class is in both data parts.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise DataError("allocate: labels must be a non-empty 1-D array")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError("allocate: labels must be non-negative integers")
    if scenario not in SCENARIOS:
        raise DataError(f"allocate: unknown scenario {scenario!r}; expected one of {list(SCENARIOS)}")
    if not 0.0 < ratio < 1.0:
        raise DataError(f"allocate: ratio must be in (0, 1), got {ratio}")
    if class_order not in get_args(ClassOrder):
        raise DataError(f"allocate: class_order must be one of {list(get_args(ClassOrder))}, "
                        f"got {class_order!r}")
    if class_order != "random" and not scenario.endswith("-class"):
        raise DataError(f"allocate: class_order={class_order!r} applies to a class split, not to {scenario}")
    if "class" in scenario and len(np.unique(labels)) < 2:
        raise DataError("allocate: a class split needs at least two classes")
    rng = np.random.default_rng(seed)
    everything = np.ones(len(labels), dtype=bool)
    if scenario.endswith("-data"):
        old_mask, rest = data_split(labels, ratio, rng)
        new_mask = {"extended-data": everything, "open-data": rest, "identical-data": old_mask}[
            scenario
        ]
    else:
        old_mask = class_split(labels, ratio, rng, class_order)
        new_mask = everything if scenario == "extended-class" else ~old_mask
    old_idx = np.flatnonzero(old_mask)
    new_idx = np.flatnonzero(new_mask)
    old_classes, old_labels = _relabel(labels, old_idx)
    new_classes, new_labels = _relabel(labels, new_idx)
    new_to_old = label_map(new_classes, old_classes)
    return Allocation(
        scenario, ratio, seed, class_order, old_idx, new_idx, old_labels, new_labels, old_classes,
        new_classes, new_to_old,
    )
