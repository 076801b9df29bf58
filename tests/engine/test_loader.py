"""The loader: seeded order, identical batches at any worker count, worker errors as one line."""

import numpy as np
import pytest
import torch

from bctkit.data.sources import ArraySource, CorruptImageError, ImageFolderSource
from bctkit.data.transforms import Preprocess, TransformConfig
from bctkit.engine.loader import Feed, epoch_batches, sequential_batches
from bctkit.errors import DataError
from tests.data.sources.conftest import encoded_images, write_folder


def test_epoch_order_is_seeded_randperm():
    batches = epoch_batches(50, 16, seed=7, epoch=3)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(7 * 100_003 + 3)).numpy()
    assert [b.step for b in batches] == [0, 1, 2]  # remainder of 2 dropped
    assert np.array_equal(np.concatenate([b.indices for b in batches]), perm[:48])
    assert [b.step for b in epoch_batches(50, 16, 7, 3, start_step=2)] == [2]
    assert np.array_equal(epoch_batches(50, 16, 7, 3, start_step=2)[0].indices, perm[32:48])
    small = epoch_batches(5, 16, 0, 0)
    assert len(small) == 1 and sorted(small[0].indices.tolist()) == list(range(5))
    assert [len(b.indices) for b in sequential_batches(10, 4)] == [4, 4, 2]


@pytest.fixture
def folder(tmp_path):
    return ImageFolderSource(write_folder(tmp_path / "ds", encoded_images(4, 5, size=(9, 9))))


def _read_all(feed, batches, **kw):
    return [tuple(t.clone() for t in out) for out in feed.read(batches, **kw)]


@pytest.mark.parametrize("augment", [{}, {"hflip": True, "crop_pad": 2, "seed": 5}])
def test_workers_change_nothing(folder, augment):
    pre = Preprocess(TransformConfig(color="rgb"))
    batches = epoch_batches(len(folder), 6, seed=1, epoch=0) + epoch_batches(len(folder), 6, seed=1, epoch=1)
    alone = _read_all(Feed(folder, pre, workers=0), batches, **augment)
    pooled = _read_all(Feed(folder, pre, workers=2), batches, **augment)
    for a, b in zip(alone, pooled, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    images, labels, idx = alone[0]
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 9, 9)
    assert torch.equal(labels, torch.from_numpy(folder.labels[idx.numpy()]))
    if not augment:
        assert torch.equal(images[0], torch.from_numpy(np.array(pre(folder.read(int(idx[0]))))))


def test_reading_leaves_the_global_rng_alone(folder):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    feed = Feed(folder, Preprocess(TransformConfig(color="rgb")), workers=2)
    _read_all(feed, sequential_batches(len(folder), 7))
    assert torch.equal(torch.rand(3), expected)


def test_worker_errors_are_one_line(folder, tmp_path):
    (folder.root / "id01" / "img1.jpg").write_bytes(b"\xff\xd8\xff broken")
    feed = Feed(folder, Preprocess(TransformConfig(color="rgb")), workers=2)
    with pytest.raises(CorruptImageError, match=r"id01/img1\.jpg: corrupt or truncated image") as err:
        _read_all(feed, sequential_batches(len(folder), 4))
    assert "\n" not in str(err.value) and "DataLoader worker" not in str(err.value)
    bad = feed.find_corrupt(batch_size=3, progress=False)
    assert [folder.key(int(i)) for i in bad] == ["id01/img1.jpg"]


def test_mixed_sizes_need_a_transform(tmp_path):
    items = encoded_images(2, 2, size=(8, 8)) + [(1, "big.png", encoded_images(1, 1, size=(9, 8))[0][2])]
    src = ImageFolderSource(write_folder(tmp_path / "ds", items))
    with pytest.raises(DataError, match=r"big\.png: image is 3x9x8 .* first image is 3x8x8; .*transform"):
        _read_all(Feed(src), sequential_batches(len(src), 8))
    fixed = Feed(src, Preprocess(TransformConfig(resize=8, color="rgb")))
    assert _read_all(fixed, sequential_batches(len(src), 8))[0][0].shape == (5, 3, 8, 8)


def test_array_fast_path_is_a_plain_index():
    images = np.random.default_rng(0).integers(0, 256, (20, 1, 4, 4), dtype=np.uint8)
    feed = Feed(ArraySource(images, np.arange(20) % 3))
    (batch, labels, idx), = _read_all(feed, [epoch_batches(20, 32, 3, 0)[0]])
    assert torch.equal(batch, torch.from_numpy(images[idx.numpy()]))
