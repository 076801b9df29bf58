"""Allocations: sizes, disjointness, singleton rule and label maps for all five scenarios."""

import math

import numpy as np
import pytest

from bctkit.data import SCENARIOS, allocate
from bctkit.errors import DataError

COUNTS = [1, 2, 3, 4, 5, 10, 20, 1, 7, 9, 13, 6, 1, 30, 8, 2, 11, 4, 3, 5]


@pytest.fixture
def labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.permutation(np.repeat(np.arange(len(COUNTS)), COUNTS))


def _data_part_sizes() -> tuple[int, int]:
    old = sum(max(1, math.floor(0.3 * n)) for n in COUNTS)
    rest = sum(n - max(1, math.floor(0.3 * n)) + (n == 1) for n in COUNTS)
    return old, rest


def test_data_split_sizes_and_singletons(labels):
    n_old, n_rest = _data_part_sizes()
    for scenario in ("extended-data", "open-data", "identical-data"):
        a = allocate(labels, scenario)
        assert len(a.old_indices) == n_old
        per_class = np.bincount(labels[a.old_indices], minlength=len(COUNTS))
        assert per_class.tolist() == [max(1, math.floor(0.3 * n)) for n in COUNTS]
        assert a.num_old_classes == len(COUNTS)
    a = allocate(labels, "open-data")
    assert len(a.new_indices) == n_rest
    shared = np.intersect1d(a.old_indices, a.new_indices)
    assert sorted(labels[shared].tolist()) == [c for c, n in enumerate(COUNTS) if n == 1]
    assert np.all(a.new_to_old >= 0)


def test_extended_and_identical(labels):
    ext = allocate(labels, "extended-data")
    assert np.array_equal(ext.new_indices, np.arange(len(labels)))
    ident = allocate(labels, "identical-data")
    assert np.array_equal(ident.old_indices, ident.new_indices)
    assert np.array_equal(ident.old_indices, ext.old_indices)


def test_class_split(labels):
    k = math.floor(0.3 * len(COUNTS))
    oc = allocate(labels, "open-class")
    assert oc.num_old_classes == k and oc.num_new_classes == len(COUNTS) - k
    assert np.intersect1d(oc.old_indices, oc.new_indices).size == 0
    assert np.intersect1d(oc.old_classes, oc.new_classes).size == 0
    assert len(oc.old_indices) + len(oc.new_indices) == len(labels)
    assert np.all(oc.new_to_old == -1)
    ec = allocate(labels, "extended-class")
    assert np.array_equal(ec.old_indices, oc.old_indices)
    assert ec.num_new_classes == len(COUNTS)
    assert (ec.new_to_old >= 0).sum() == k


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_label_maps(labels, scenario):
    a = allocate(labels, scenario)
    assert np.array_equal(a.old_classes[a.old_labels], labels[a.old_indices])
    assert np.array_equal(a.new_classes[a.new_labels], labels[a.new_indices])
    assert a.new_labels.min() == 0 and a.new_labels.max() == a.num_new_classes - 1
    known = a.new_to_old >= 0
    assert np.array_equal(a.old_classes[a.new_to_old[known]], a.new_classes[known])
    assert not np.isin(a.new_classes[~known], a.old_classes).any()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_seeded(labels, scenario):
    a, b = allocate(labels, scenario, seed=1), allocate(labels, scenario, seed=1)
    c = allocate(labels, scenario, seed=2)
    assert np.array_equal(a.old_indices, b.old_indices)
    assert not np.array_equal(a.old_indices, c.old_indices)


def test_bad_input(labels):
    with pytest.raises(DataError, match="unknown scenario"):
        allocate(labels, "extended")
    with pytest.raises(DataError, match="ratio"):
        allocate(labels, "open-data", ratio=1.5)
    with pytest.raises(DataError, match="non-negative"):
        allocate(np.array([0, -1, 2]), "open-data")


def test_first_classes_in_dataset_order():
    """BT^2's split: the old model sees the first half of the classes by id (CIFAR-100's 0-49), the
    new model all of them; the pool's order of images does not matter."""
    rng = np.random.default_rng(1)
    labels = rng.permutation(np.repeat(np.arange(100), 3))
    a = allocate(labels, "extended-class", 0.5, seed=5, class_order="first")
    assert a.old_classes.tolist() == list(range(50))
    assert np.array_equal(a.old_indices, np.flatnonzero(labels < 50))
    assert np.array_equal(a.new_indices, np.arange(len(labels)))
    assert a.new_to_old.tolist() == list(range(50)) + [-1] * 50
    assert a.summary()["classes"] == "first in dataset order"
    other_seed = allocate(labels, "extended-class", 0.5, seed=6, class_order="first")
    assert np.array_equal(other_seed.old_indices, a.old_indices)  # no draw: the seed plays no part
    drawn = allocate(labels, "extended-class", 0.5, seed=5)
    assert drawn.old_classes.tolist() != list(range(50)) and "classes" not in drawn.summary()
    oc = allocate(labels, "open-class", 0.3, class_order="first")
    assert oc.old_classes.tolist() == list(range(30)) and oc.new_classes.tolist() == list(range(30, 100))


def test_first_classes_refused_for_data_splits():
    with pytest.raises(DataError, match="applies to a class split, not to extended-data"):
        allocate(np.repeat(np.arange(4), 2), "extended-data", class_order="first")
    with pytest.raises(DataError, match="class_order must be one of"):
        allocate(np.repeat(np.arange(4), 2), "extended-class", class_order="last")
