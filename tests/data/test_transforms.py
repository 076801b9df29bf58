"""Preprocessing and augmentation against direct computations."""

import numpy as np
import pytest
import torch
from PIL import Image

from bctkit.data.transforms import Preprocess, TransformConfig, augment_batch
from bctkit.errors import DataError


def _rgb(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)


def test_identity_passes_arrays_through():
    x = _rgb()
    assert Preprocess()(x) is x


def test_resize_crop_colour_match_pillow():
    x = _rgb()
    pil = Image.fromarray(x.transpose(1, 2, 0))
    cfg = TransformConfig(color="grey", resize=[16, 24], crop=[12, 20])
    out = Preprocess(cfg)(x)
    ref = np.asarray(pil.convert("L").resize((24, 16), Image.Resampling.BILINEAR))[2:14, 2:22]
    assert out.shape == (1, 12, 20) and np.array_equal(out[0], ref)
    grey = np.random.default_rng(1).integers(0, 256, (1, 8, 8), dtype=np.uint8)
    rgb = Preprocess(TransformConfig(color="rgb"))(grey)
    assert rgb.shape == (3, 8, 8) and all(np.array_equal(rgb[c], grey[0]) for c in range(3))
    assert TransformConfig(resize=32).resize == (32, 32)


def test_config_conflicts_are_load_time_errors():
    with pytest.raises(ValueError, match="larger than resize"):
        TransformConfig(resize=[16, 16], crop=[20, 10])
    with pytest.raises(ValueError, match="std must be positive"):
        TransformConfig(std=[0.5, 0.0, 0.5], mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="one mean and one std"):
        TransformConfig(color="grey", mean=[0.1, 0.2, 0.3], std=[1, 1, 1])
    with pytest.raises(DataError, match="larger than the 20x30 image"):
        Preprocess(TransformConfig(crop=[25, 10]))(_rgb())


def test_normalize_is_per_channel_and_default_is_the_historic_mapping():
    x = torch.from_numpy(np.stack([_rgb(seed=s) for s in range(2)]))
    assert torch.equal(Preprocess().normalize(x), x.float().div(127.5).sub(1.0))
    cfg = TransformConfig(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    ref = (x.double() / 255 - torch.tensor(cfg.mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        cfg.std, dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(Preprocess(cfg).normalize(x).double(), ref, atol=1e-5)


def test_augment_batch_flip_and_crop():
    x = np.stack([_rgb(6, 7, seed=s) for s in range(8)])
    out = augment_batch(x, hflip=True, crop_pad=2, rng=np.random.default_rng(3))
    rng = np.random.default_rng(3)
    flip = rng.random(8) < 0.5
    dy, dx = rng.integers(0, 5, 8), rng.integers(0, 5, 8)
    for i in range(8):
        img = x[i][:, :, ::-1] if flip[i] else x[i]
        padded = np.pad(img, ((0, 0), (2, 2), (2, 2)), mode="edge")
        assert np.array_equal(out[i], padded[:, dy[i]:dy[i] + 6, dx[i]:dx[i] + 7]), i
    assert 0 < flip.sum() < 8
    assert np.array_equal(augment_batch(x, False, 0, np.random.default_rng(0)), x)


@pytest.mark.parametrize("cfg", [{}, {"color": "rgb"}, {"color": "bgr"}, {"color": "grey"},
                                 {"color": "bgr", "resize": [9, 7], "crop": [6, 5]}])
def test_into_writes_the_bytes_of_a_call(cfg):
    rng = np.random.default_rng(3)
    pre = Preprocess(TransformConfig(**cfg))
    for img in (Image.fromarray(rng.integers(0, 256, (11, 8, 3), dtype=np.uint8)),
                Image.fromarray(rng.integers(0, 256, (11, 8), dtype=np.uint8)),
                rng.integers(0, 256, (3, 11, 8), dtype=np.uint8)):
        want = pre(img)
        batch = np.zeros((2, *want.shape), dtype=np.uint8)
        assert pre.into(img, batch[1]) == want.shape
        assert np.array_equal(batch[1], want) and not batch[0].any()
        other = np.zeros((want.shape[0], want.shape[1] + 1, want.shape[2]), dtype=np.uint8)
        assert pre.into(img, other) == want.shape and not other.any()  # a wrong size is left alone
