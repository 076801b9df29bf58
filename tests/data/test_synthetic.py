"""The synthetic dataset: deterministic, class-consistent, and varied within a class."""

import numpy as np

from bctkit.data import SyntheticSpec, make_synthetic
from bctkit.data.datasets import DataConfig, SyntheticConfig, load_datasets


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
