"""The synthetic dataset: deterministic, class-consistent, and varied within a class."""

import numpy as np
import pytest

from bctkit.data import SyntheticSpec, make_synthetic
from bctkit.data.datasets import DataConfig, SyntheticConfig, load_datasets
from bctkit.errors import ConfigError


def test_deterministic_and_prefix_stable():
    a = make_synthetic(SyntheticSpec(num_classes=6, images_per_class=4, seed=3))
    b = make_synthetic(SyntheticSpec(num_classes=6, images_per_class=4, seed=3))
    c = make_synthetic(SyntheticSpec(num_classes=9, images_per_class=4, seed=3))
    d = make_synthetic(SyntheticSpec(num_classes=6, images_per_class=4, seed=4))
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.images, c.images[:24])
    assert not np.array_equal(a.images, d.images)
    assert a.images.shape == (24, 1, 32, 32) and a.images.dtype == np.uint8


def test_images_resemble_their_class():
    s = make_synthetic(SyntheticSpec(num_classes=20, images_per_class=6, occlusion_prob=0.0, seed=1))
    x = s.images.reshape(len(s), -1).astype(np.float64)
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    corr = x @ x.T / x.shape[1]
    same = s.labels[:, None] == s.labels[None, :]
    off = ~np.eye(len(s), dtype=bool)
    assert corr[same & off].mean() > corr[~same].mean() + 0.2
    assert np.abs(x[0] - x[1]).mean() > 0.1


def test_channels_and_held_out_pool():
    cfg = DataConfig(synthetic=SyntheticConfig(num_classes=5, images_per_class=3, channels=3, size=16),
                     eval_classes=4, eval_images_per_class=2)
    pool, held = load_datasets(cfg)
    assert pool.images.shape == (15, 3, 16, 16) and held.images.shape == (8, 3, 16, 16)
    assert held.labels.max() == 3
    flat_pool = {img.tobytes() for img in pool.images}
    assert not any(img.tobytes() in flat_pool for img in held.images)


def test_validation_identities_are_neither_pool_nor_test_and_change_neither():
    syn = SyntheticConfig(num_classes=5, images_per_class=3, size=16)
    plain = DataConfig(synthetic=syn, eval_classes=4, eval_images_per_class=2)
    with_val = plain.model_copy(update={"validation_classes": 3})
    pool, test = load_datasets(plain)
    pool2, test2 = load_datasets(with_val)
    assert np.array_equal(pool.images, pool2.images) and np.array_equal(test.images, test2.images)
    same_pool, val = load_datasets(with_val, split="validation")
    assert np.array_equal(same_pool.images, pool.images)
    assert val.images.shape == (6, 1, 16, 16) and np.array_equal(val.labels, np.repeat(np.arange(3), 2))
    assert "validation" in val.name and "validation" not in test2.name
    # the identities follow the test ones: generated as classes 9, 10, 11 of the same dataset
    beyond = make_synthetic(SyntheticSpec(num_classes=3, images_per_class=2, size=16, first_class=9))
    assert np.array_equal(val.images, beyond.images)
    seen = {img.tobytes() for img in np.concatenate([pool.images, test.images])}
    assert not any(img.tobytes() in seen for img in val.images)
    assert "validation_classes" not in plain.model_dump() and with_val.model_dump()["validation_classes"] == 3
    with pytest.raises(ConfigError, match="data.validation_classes=0: the validation split needs"):
        load_datasets(plain, split="validation")


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [("num_classes", -3, "an integer >= 1"), ("num_classes", 0, "an integer >= 1"),
     ("images_per_class", 0, "an integer >= 1"), ("num_classes", 2.5, "an integer >= 1"),
     ("size", 2, "an integer >= 4"), ("channels", 0, "an integer >= 1"), ("basis", 0, "an integer >= 1"),
     ("strokes", -1, "an integer >= 0"), ("first_class", -1, "an integer >= 0"),
     ("occlusion_prob", 1.5, r"a number in \[0, 1\]"), ("occlusion_max", -0.1, r"a number in \[0, 1\]"),
     ("noise", -0.5, "a number >= 0"), ("scale", 1.0, r"a number in \[0, 1\)"),
     ("contrast", float("nan"), r"a number in \[0, 1\]")],
)
def test_bad_spec_is_a_config_error_naming_the_field(field, value, allowed):
    with pytest.raises(ConfigError, match=rf"SyntheticSpec\.{field}={value}: must be {allowed}"):
        SyntheticSpec(**{field: value})
