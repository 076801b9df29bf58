"""Reading a dataset source in batches through torch's DataLoader, for training, the old-feature cache
and extraction alike.

- Order: a training epoch's order is ``torch.randperm`` seeded by (seed, epoch) only, cut into
  ``max(1, N // batch_size)`` batches (the remainder is dropped); extraction reads 0..N-1 in order.
  Each batch is a :class:`Batch` (epoch, step, indices), so a run that resumes at step k of an
  epoch reads exactly the batches it would have read, and the number of workers changes nothing.
- Work split: a worker decodes, preprocesses and augments one whole batch into a uint8
  [B, C, H, W] array (augmentation randomness is seeded by (seed, epoch, step)); the main process
  normalises it on the model's device (:meth:`bctkit.data.transforms.Preprocess.normalize`).
- Memory: each read's workers decode into a pool of reused shared-memory batch buffers made before
  they start (:mod:`bctkit.data.slots`); the main process gets a tensor over a buffer, which goes back
  to its worker once that tensor and its views are dropped (a worker with none free uses a fresh one).
- Errors: a bctkit error in a worker (a corrupt image, a wrong size) comes back as the same one-line
  error in the main process, not as a worker traceback (the worker plumbing is
  :mod:`bctkit.data.workers`).
- The DataLoader gets its own seeded generator, so reading never consumes the global torch RNG
  (training's dropout draws are the same with or without workers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from bctkit.data.slots import SlotBatch, SlotPool, shared_buffer
from bctkit.data.sources.array import ArraySource
from bctkit.data.sources.base import DataSource
from bctkit.data.transforms import Preprocess, augment_batch
from bctkit.data.workers import PREFETCH, WorkerFailure, find_corrupt, run_batches
from bctkit.errors import BctkitError, DataError

__all__ = ["Batch", "Feed", "as_feed", "epoch_batches", "sequential_batches"]


class Batch(NamedTuple):
    """One batch to read: its epoch and step (which seed its augmentation) and source indices. Under
    several processes a rank reads rows ``offset``.. of a global batch of ``total`` rows (0: this batch
    is the whole one); augmentation is drawn for the global batch, so it does not depend on the split."""

    epoch: int
    step: int
    indices: np.ndarray
    offset: int = 0
    total: int = 0

    def share(self, start: int, end: int) -> Batch:
        """Rows [start, end) of this (global) batch, as one rank reads them."""
        return Batch(self.epoch, self.step, self.indices[start:end], self.offset + start,
                     self.total or len(self.indices))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, start_step: int = 0) -> list[Batch]:
    """The training batches of ``epoch`` from ``start_step`` on: a permutation seeded by
    (seed, epoch), ``max(1, n // batch_size)`` full batches (all n items when n < batch_size)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen).numpy()
    steps = max(1, n // batch_size)
    return [Batch(epoch, it, perm[it * batch_size:(it + 1) * batch_size] if n >= batch_size else perm)
            for it in range(start_step, steps)]


def sequential_batches(n: int, batch_size: int) -> list[Batch]:
    """Items 0..n-1 in order, ``batch_size`` at a time (the last batch may be smaller)."""
    return [Batch(0, k, np.arange(s, min(s + batch_size, n), dtype=np.int64))
            for k, s in enumerate(range(0, n, batch_size))]


class _BatchReader(torch.utils.data.Dataset):
    """What a worker runs: Batch -> (uint8 images, labels, indices), or a SlotBatch naming the slot of
    ``pool`` the images were written into."""

    def __init__(self, source: DataSource, preprocess: Preprocess, shape: tuple[int, int, int],
                 hflip: bool, crop_pad: int, seed: int, pool: SlotPool | None = None) -> None:
        self.source, self.preprocess, self.shape = source, preprocess, shape
        self.hflip, self.crop_pad, self.seed, self.pool = hflip, crop_pad, seed, pool

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, batch: Batch) -> Any:
        slot = self.pool.claim() if self.pool is not None else None
        try:
            return self._read(batch, slot)
        except BaseException as exc:
            if slot is not None:
                self.pool.release(slot)  # type: ignore[union-attr]
            if isinstance(exc, BctkitError):
                return WorkerFailure(exc)
            raise

    def _read(self, batch: Batch, slot: int | None) -> Any:
        idx = batch.indices
        images = self._decode(idx, slot)
        if self.hflip or self.crop_pad:
            rng = np.random.default_rng([self.seed, batch.epoch, batch.step, 0x617567])
            arrays = images.numpy()
            arrays[:] = augment_batch(arrays, self.hflip, self.crop_pad, rng, batch.offset,
                                      batch.total or len(idx))
        labels = self.source.labels[idx]
        indices = np.asarray(idx, dtype=np.int64)
        if slot is not None:
            return SlotBatch(self.pool, slot, len(idx), (labels, indices))  # type: ignore[arg-type]
        return images, torch.from_numpy(labels), torch.from_numpy(indices)

    def _decode(self, idx: np.ndarray, slot: int | None) -> torch.Tensor:
        """The batch's images, uint8 [B, C, H, W] (in ``slot`` when given)."""
        if self.source.reads_batches and self.preprocess.identity:
            raw = self.source.read_many(idx)
            if raw.shape[1:] != self.shape:
                self._wrong_shape(int(idx[0]), raw.shape[1:])
            if slot is None and raw.strides == _c_strides(raw.shape, raw.itemsize):
                return torch.from_numpy(raw)
            # a slot, or e.g. gathered from stack[:, None]: channels-last strides would change torch's kernels
            images = self._buffer(len(idx), slot)
            images.numpy()[...] = raw
            return images
        images = self._buffer(len(idx), slot)
        arrays = images.numpy()
        for j, i in enumerate(idx):  # one image at a time: a batch of decoded images stays out of cache
            shape = self.preprocess.into(self.source.read(int(i)), arrays[j])
            if shape != self.shape:
                self._wrong_shape(int(i), shape)
        return images

    def _buffer(self, n: int, slot: int | None) -> torch.Tensor:
        if slot is not None:
            return torch.from_numpy(self.pool.array(slot, n))  # type: ignore[union-attr]
        return _batch_buffer((n, *self.shape))

    def _wrong_shape(self, i: int, shape: tuple[int, ...]) -> None:
        raise DataError(
            f"{self.source.describe(i)}: image is {'x'.join(map(str, shape))} (C x H x W) but the first "
            f"image is {'x'.join(map(str, self.shape))}; images of different sizes or colours need "
            "data.transform (e.g. resize: [112, 112], color: rgb)")


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """The strides of a C-ordered array of ``shape``, size-1 axes included: a batch with other
    strides (a zero or unit stride on a 1-channel axis, say) has the same values, but torch picks its
    memory format from the strides, hence other convolution kernels and other rounding."""
    out, step = [], itemsize
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 tensor to decode a batch into: in a worker process it lives in shared memory
    from the start (as torch's default_collate does it), so sending it to the main process copies
    nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.from_numpy(np.empty(shape, dtype=np.uint8))  # numpy's malloc reuses freed blocks
    return shared_buffer(shape)


class Feed:
    """A source as a model reads it: the source, its preprocessing, and the loader's workers.

    ``workers``: DataLoader worker processes (0: read in this process). ``pin_memory``: page-locked
    batches for fast copies to a GPU (ignored without CUDA).
    """

    def __init__(self, source: DataSource, preprocess: Preprocess | None = None, workers: int = 0,
                 pin_memory: bool = False) -> None:
        if workers < 0:
            raise DataError(f"loader workers must be >= 0, got {workers}")
        self.source = source
        self.preprocess = preprocess or Preprocess()
        self.workers = workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._shape: tuple[int, int, int] | None = None

    def with_source(self, source: DataSource) -> Feed:
        """The same preprocessing and loader settings over another source (a subset, say)."""
        return Feed(source, self.preprocess, self.workers, self.pin_memory)

    def with_preprocess(self, preprocess: Preprocess) -> Feed:
        """The same source and loader settings read through another preprocessing (a model given
        from outside reads images its own way)."""
        return Feed(self.source, preprocess, self.workers, self.pin_memory)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of every preprocessed image (decodes the first image once to learn it)."""
        if self._shape is None:
            if len(self.source) == 0:
                raise DataError(f"{self.source.name}: no images")
            stored = self.source.stored_shape()
            if stored is not None and self.preprocess.identity:
                self._shape = stored
            else:
                first = self.preprocess(self.source.read(0))
                self._shape = (int(first.shape[0]), int(first.shape[1]), int(first.shape[2]))
        return self._shape

    def spec(self) -> dict[str, Any]:
        """The preprocessing as saved with a model."""
        return self.preprocess.spec(self.input_shape)

    def read(self, batches: Sequence[Batch], hflip: bool = False, crop_pad: int = 0, seed: int = 0
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels, indices) of each of ``batches`` in order, with train-time
        augmentation when ``hflip`` / ``crop_pad`` are set."""
        if not batches:
            return
        workers = min(self.workers, len(batches))
        pool = None
        if workers:  # reused slots per worker: the batches it has queued, one being read, one spare
            rows = max(len(b.indices) for b in batches)
            pool = SlotPool(workers, PREFETCH + 2, (rows, *self.input_shape))
        reader = _BatchReader(self.source, self.preprocess, self.input_shape, hflip, crop_pad, seed, pool)
        yield from run_batches(reader, batches, workers, self.pin_memory)

    def find_corrupt(self, batch_size: int = 256, progress: bool = True) -> np.ndarray:
        """Indices of the images that cannot be decoded (decodes every image once, in the workers)."""
        return find_corrupt(self.source, self.workers, batch_size, progress)


def as_feed(data: Feed | DataSource | np.ndarray) -> Feed:
    """What to read images from: a Feed as is, a source with the default preprocessing, or a uint8
    [N, C, H, W] array."""
    if isinstance(data, Feed):
        return data
    if isinstance(data, DataSource):
        return Feed(data)
    if isinstance(data, np.ndarray):
        return Feed(ArraySource(data, np.zeros(len(data), dtype=np.int64), name="images"))
    raise DataError(f"cannot read images from a {type(data).__name__}")
