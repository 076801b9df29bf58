"""Label noise: exactly the requested share relabelled, always to another class, uniformly, seeded,
the evaluation set untouched, and clean configs unchanged."""

import numpy as np
import pytest
from pydantic import ValidationError

from bctkit.data.datasets import DataConfig, SyntheticConfig, load_datasets
from bctkit.data.noise import flip_labels
from bctkit.errors import ConfigError, DataError
from bctkit.run.config import parse_config


def test_exact_count_other_class_and_seeded():
    y = np.repeat(np.arange(50), 20)
    noisy, idx = flip_labels(y, 0.25, seed=3)
    changed = np.flatnonzero(noisy != y)
    assert len(idx) == 250 and np.array_equal(changed, idx)
    assert noisy.dtype == np.int64 and noisy.min() >= 0 and noisy.max() < 50
    again, idx2 = flip_labels(y, 0.25, seed=3)
    other, idx3 = flip_labels(y, 0.25, seed=4)
    assert np.array_equal(again, noisy) and np.array_equal(idx2, idx)
    assert not np.array_equal(idx3, idx)
    assert np.array_equal(y, np.repeat(np.arange(50), 20))  # the input is not modified


def test_rounding_and_zero():
    y = np.repeat(np.arange(3), 3)  # 9 images: 0.5 * 9 = 4.5 rounds half up to 5
    assert len(flip_labels(y, 0.5, seed=0)[1]) == 5
    noisy, idx = flip_labels(y, 0.0, seed=0)
    assert np.array_equal(noisy, y) and len(idx) == 0


def test_new_labels_uniform_over_the_other_classes():
    c = 5
    y = np.zeros(40_000, dtype=np.int64)
    y[:c] = np.arange(c)  # every class present; almost all images are class 0
    noisy, idx = flip_labels(y, 0.5, seed=1, num_classes=c)
    from_zero = noisy[idx][y[idx] == 0]
    counts = np.bincount(from_zero, minlength=c)
    assert counts[0] == 0
    expected = len(from_zero) / (c - 1)
    chi2 = ((counts[1:] - expected) ** 2 / expected).sum()
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001


def test_bad_input():
    with pytest.raises(ConfigError, match="label_noise is 1.0"):
        flip_labels(np.arange(4), 1.0, seed=0)
    with pytest.raises(DataError, match="at least 2 classes"):
        flip_labels(np.zeros(4, dtype=np.int64), 0.5, seed=0)
    with pytest.raises(DataError, match="expected 1-D integers"):
        flip_labels(np.zeros(4), 0.5, seed=0)
    with pytest.raises(DataError, match="relabels every image of class"):
        flip_labels(np.array([0, 1, 1, 1, 1, 1, 1, 1]), 0.9, seed=0)
    with pytest.raises(ValidationError, match="label_noise"):
        DataConfig(label_noise=-0.1)


def test_load_datasets_noises_the_pool_only():
    syn = SyntheticConfig(num_classes=6, images_per_class=5, size=16)
    clean_pool, clean_eval = load_datasets(DataConfig(synthetic=syn, eval_classes=3, eval_images_per_class=2))
    cfg = DataConfig(synthetic=syn, eval_classes=3, eval_images_per_class=2, label_noise=0.2,
                     label_noise_seed=7)
    pool, held = load_datasets(cfg)
    assert np.array_equal(pool.parent.images, clean_pool.images)
    assert (pool.labels != clean_pool.labels).sum() == 6
    assert "6 of 30 labels flipped (seed 7)" in pool.name
    assert pool.fingerprint() != clean_pool.fingerprint()
    assert np.array_equal(held.labels, clean_eval.labels) and np.array_equal(held.images, clean_eval.images)


def test_clean_configs_dump_without_noise_fields():
    assert "label_noise" not in DataConfig().model_dump()
    dumped = DataConfig(label_noise=0.1).model_dump()
    assert dumped["label_noise"] == 0.1 and dumped["label_noise_seed"] == 0
    cfg = parse_config({"data": {"label_noise": 0.2}})
    assert cfg.data.label_noise == 0.2
