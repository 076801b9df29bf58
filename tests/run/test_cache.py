"""The old-feature cache: computed once, reused, rebuilt when inputs change or the file is damaged."""

import json

import numpy as np
import pytest
import torch

from bctkit.errors import DataError
from bctkit.features import extract
from bctkit.losses.unibct.prototypes import class_means
from bctkit.models import BackboneConfig, build_backbone
from bctkit.models.store import fingerprint
from bctkit.run.cache import OldFeatureCache, as_tensor, class_means_from_cache


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    net = build_backbone(BackboneConfig(arch="r8", width=4, embedding_dim=8, image_size=16))
    calls = [0]
    net.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    images = np.random.default_rng(0).integers(0, 256, (23, 1, 16, 16), dtype=np.uint8)
    return net, calls, images


def _get(cache, net, images, **kw):
    return cache.get(net, fingerprint(net), images, "imgs-" + str(images.sum()), batch_size=4,
                     progress=False, **kw)


def test_computed_once_then_reused(tmp_path, setup):
    net, calls, images = setup
    cache = OldFeatureCache(tmp_path)
    first = _get(cache, net, images)
    assert (cache.hits, cache.misses) == (0, 1) and calls[0] > 0
    assert isinstance(first, np.memmap) and not first.flags.writeable
    assert np.allclose(first, extract(net, images, progress=False).numpy(), atol=1e-6)
    seen = calls[0]
    again = OldFeatureCache(tmp_path)  # another run, same root
    second = _get(again, net, images)
    assert (again.hits, again.misses) == (1, 0) and calls[0] == seen
    assert np.array_equal(first, second)
    t = as_tensor(second)
    assert torch.equal(t, torch.from_numpy(np.array(second)))
    t.mul_(0)  # copy-on-write: the file is untouched
    assert np.array_equal(_get(again, net, images), first) and calls[0] == seen


def test_flip_and_float16_are_other_entries(tmp_path, setup):
    net, calls, images = setup
    cache = OldFeatureCache(tmp_path)
    plain = _get(cache, net, images)
    flipped = _get(cache, net, images, flip=True)
    half = _get(cache, net, images, dtype="float16")
    assert cache.misses == 3 and len(list(tmp_path.glob("old-*.npy"))) == 3
    ref = extract(net, images, flip=True, progress=False).numpy() / 2
    assert np.allclose(flipped, ref, atol=1e-6)
    assert half.dtype == np.float16 and np.allclose(half, plain, atol=1e-2, rtol=1e-3)


def test_rebuilt_when_model_or_images_change(tmp_path, setup):
    net, calls, images = setup
    cache = OldFeatureCache(tmp_path)
    _get(cache, net, images)
    with torch.no_grad():
        next(net.parameters()).add_(0.1)
    seen = calls[0]
    changed_model = _get(cache, net, images)
    assert cache.misses == 2 and calls[0] > seen
    assert np.allclose(changed_model, extract(net, images, progress=False).numpy(), atol=1e-6)
    other = images.copy()
    other[0, 0, 0, 0] ^= 1
    _get(cache, net, other)
    assert cache.misses == 3 and cache.hits == 0


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "sidecar", "no_sidecar"])
def test_damaged_entry_is_rebuilt(tmp_path, setup, damage):
    net, calls, images = setup
    cache = OldFeatureCache(tmp_path)
    good = np.array(_get(cache, net, images))
    npy, side = cache.paths(cache.key(fingerprint(net), "imgs-" + str(images.sum())))
    raw = npy.read_bytes()
    if damage == "truncate":
        npy.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_byte":
        npy.write_bytes(raw[:-5] + bytes([raw[-5] ^ 0xFF]) + raw[-4:])
    elif damage == "sidecar":
        side.write_text("{not json")
    else:
        side.unlink()
    seen = calls[0]
    rebuilt = _get(cache, net, images)
    assert cache.misses == 2 and calls[0] > seen
    assert np.array_equal(rebuilt, good)
    assert json.loads(side.read_text())["shape"] == [23, 8]


def test_bad_images_and_class_means(tmp_path, setup):
    net, _, images = setup
    cache = OldFeatureCache(tmp_path)
    with pytest.raises(DataError, match="uint8"):
        cache.get(net, "fp", images.astype(np.float32), "x", progress=False)
    with pytest.raises(DataError, match="no images"):
        cache.get(net, "fp", images[:0], "x", progress=False)
    feats = _get(cache, net, images)
    labels = np.arange(23) % 5
    assert torch.allclose(class_means_from_cache(feats, labels, 5),
                          class_means(torch.from_numpy(np.array(feats)), torch.from_numpy(labels), 5))
