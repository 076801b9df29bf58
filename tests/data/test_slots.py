"""Reused worker batch buffers: batches identical to fresh buffers, slots freed only when dropped."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bctkit.data.slots import SlotBatch, SlotPool
from bctkit.data.sources import ArraySource, ImageFolderSource
from bctkit.data.transforms import Preprocess, TransformConfig
from bctkit.data.workers import WorkerFailure
from bctkit.engine import loader
from bctkit.engine.loader import Feed, epoch_batches, sequential_batches
from tests.data.sources.conftest import encoded_images, write_folder


@pytest.fixture
def folder(tmp_path):
    return ImageFolderSource(write_folder(tmp_path / "ds", encoded_images(5, 6, size=(9, 7))))


def _read_all(feed, batches, **kw):
    return [tuple(t.clone() for t in out) for out in feed.read(batches, **kw)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for s, t in zip(x, y, strict=True):
            assert s.dtype == t.dtype and s.shape == t.shape and s.stride() == t.stride()
            assert torch.equal(s, t)


@pytest.mark.parametrize("augment", [{}, {"hflip": True, "crop_pad": 2, "seed": 3}])
def test_slots_give_the_fresh_buffer_batches(folder, monkeypatch, augment):
    feed = Feed(folder, Preprocess(TransformConfig(color="bgr")), workers=2)
    batches = epoch_batches(len(folder), 7, seed=2, epoch=0) + sequential_batches(len(folder), 8)  # 8+8+8+6
    slotted = _read_all(feed, batches, **augment)
    monkeypatch.setattr(loader, "SlotPool", lambda *args: None)  # the path before: fresh shared memory
    _same(slotted, _read_all(feed, batches, **augment))
    _same(slotted, _read_all(Feed(folder, feed.preprocess), batches, **augment))


def test_array_sources_through_slots_keep_c_strides():
    images = np.random.default_rng(1).integers(0, 256, (30, 5, 5), dtype=np.uint8)[:, None]
    src = ArraySource(images, np.arange(30) % 4)
    batches = sequential_batches(30, 8)
    _same(_read_all(Feed(src, workers=2), batches), _read_all(Feed(src), batches))


def test_held_batches_are_never_overwritten(folder):
    """A consumer that keeps every batch (no copy) holds more batches than the pool has slots: the
    workers fall back to fresh buffers instead of waiting or overwriting."""
    feed = Feed(folder, Preprocess(TransformConfig(color="rgb")), workers=1)
    batches = sequential_batches(len(folder), 2)  # 15 batches > PREFETCH + 2 slots
    held = list(feed.read(batches))
    assert not held[0][0].is_shared() and held[-1][0].is_shared()  # a slot first, fresh memory at the end
    _same(held, _read_all(Feed(folder, feed.preprocess), batches))


def test_a_slot_comes_back_when_its_last_view_is_gone(monkeypatch):
    pool = SlotPool(1, 2, (4, 1, 2, 2))
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=0))
    assert [pool.claim(), pool.claim(), pool.claim()] == [0, 1, None]
    pool.array(1, 3)[:] = 7
    images, labels = SlotBatch(pool, 1, 3, (np.arange(3),)).take()
    assert images.shape == (3, 1, 2, 2) and bool((images == 7).all()) and labels.tolist() == [0, 1, 2]
    part = images[1:]
    del images
    assert pool.claim() is None  # a view still reads slot 1
    del part
    assert pool.claim() == 1
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=1))
    assert pool.claim() is None  # a worker the pool was not made for


def test_a_failed_batch_frees_its_slot(folder, monkeypatch):
    feed = Feed(folder, Preprocess(TransformConfig(color="rgb")))
    pool = SlotPool(1, 2, (len(folder), *feed.input_shape))
    reader = loader._BatchReader(folder, feed.preprocess, feed.input_shape, False, 0, 0, pool)
    (folder.root / "id01" / "img1.jpg").write_bytes(b"\xff\xd8\xff broken")
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=0))
    failure = reader.__getitems__(sequential_batches(len(folder), len(folder))[0])
    assert isinstance(failure, WorkerFailure) and "id01/img1.jpg" in failure.message
    assert not pool.state.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_batches_are_copies(folder):
    feed = Feed(folder, Preprocess(TransformConfig(color="rgb")), workers=2, pin_memory=True)
    batches = sequential_batches(len(folder), 4)
    pinned = list(feed.read(batches))
    assert all(t.is_pinned() for out in pinned for t in out)
    _same(pinned, _read_all(Feed(folder, feed.preprocess), batches))
