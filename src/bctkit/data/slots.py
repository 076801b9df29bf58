"""Reused shared-memory batch buffers for DataLoader workers.

A worker that decodes a batch into a fresh tensor sends it to the main process through a fresh
shared-memory segment: creating it, faulting in its pages (zeroed by the kernel) and passing its file
descriptor cost about a tenth of a 112 x 112 JPEG decode per image. A :class:`SlotPool` is made in the
main process before the workers start: ``per_worker`` uint8 batch buffers ("slots") for each worker in
one shared segment, and a shared byte per slot (0 free, 1 in use). A worker claims a free slot of its
own share (only it ever sets its slots to 1, so no lock is needed), decodes into it and returns a
:class:`SlotBatch`, which names the slot instead of carrying the pixels. The main process turns it into
a tensor over the slot (:meth:`SlotBatch.take`); the slot goes back to the worker once that tensor and
every view of it are gone (a finalizer on the numpy array under the tensor's storage), so a consumer
that keeps batches never sees them overwritten. A worker that finds no free slot (a consumer holding
many batches) falls back to a fresh buffer, so nothing ever waits on the pool.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import numpy as np
import torch

__all__ = ["SlotBatch", "SlotPool", "shared_buffer"]

_POOLS: weakref.WeakValueDictionary[int, SlotPool] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def shared_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 tensor in fresh shared memory (no page touched yet)."""
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=torch.uint8).new(storage).view(shape)


class SlotPool:
    """``workers x per_worker`` shared uint8 buffers of ``shape`` (a full batch), made in the main
    process before the workers start (they inherit them, or receive them pickled under spawn)."""

    def __init__(self, workers: int, per_worker: int, shape: tuple[int, ...]) -> None:
        self.workers, self.per_worker, self.shape = workers, per_worker, tuple(shape)
        self.buffers = shared_buffer((workers * per_worker, *self.shape))
        self.state = shared_buffer((workers * per_worker,))
        self.state.zero_()
        self.key = next(_KEYS)
        _POOLS[self.key] = self

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _POOLS.setdefault(self.key, self)

    @property
    def _states(self) -> np.ndarray:
        if "_states_np" not in self.__dict__:
            self._states_np = self.state.numpy()
        return self._states_np

    @property
    def _arrays(self) -> np.ndarray:
        if "_arrays_np" not in self.__dict__:
            self._arrays_np = self.buffers.numpy()
        return self._arrays_np

    def claim(self) -> int | None:
        """In a worker: a free slot of its own share, now marked in use (None: none free, or not in a
        worker this pool was made for)."""
        info = torch.utils.data.get_worker_info()
        if info is None or info.id >= self.workers:
            return None
        lo = info.id * self.per_worker
        free = np.flatnonzero(self._states[lo:lo + self.per_worker] == 0)
        if not len(free):
            return None
        slot = lo + int(free[0])  # the lowest free slot: its pages are the likeliest to be mapped already
        self._states[slot] = 1
        return slot

    def array(self, slot: int, n: int) -> np.ndarray:
        """The first ``n`` rows of ``slot`` as a numpy array (writing into it fills the slot)."""
        return self._arrays[slot, :n]

    def release(self, slot: int) -> None:
        """Hand ``slot`` back to its worker."""
        self._states[slot] = 0

    def view(self, slot: int, n: int) -> torch.Tensor:
        """In the main process: the first ``n`` rows of ``slot`` as a tensor; the slot is released when
        the tensor and all its views are gone."""
        arr = self._arrays[slot, :n]  # a new array object, owned by the tensor's storage alone
        done = weakref.finalize(arr, self.release, slot)
        done.atexit = False
        return torch.from_numpy(arr)


class SlotBatch:
    """What a worker returns for a batch written into a pool slot: the slot, its row count and the
    batch's other (small) arrays, sent by value."""

    __slots__ = ("extras", "key", "n", "slot")

    def __init__(self, pool: SlotPool, slot: int, n: int, extras: tuple[np.ndarray, ...]) -> None:
        self.key, self.slot, self.n, self.extras = pool.key, slot, n, extras

    def __getstate__(self) -> tuple[Any, ...]:
        return self.key, self.slot, self.n, self.extras

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.key, self.slot, self.n, self.extras = state

    def take(self) -> tuple[torch.Tensor, ...]:
        """In the main process: (images over the slot, *extras as tensors)."""
        images = _POOLS[self.key].view(self.slot, self.n)
        return (images, *(torch.from_numpy(e) for e in self.extras))

    def pin_memory(self) -> tuple[torch.Tensor, ...]:
        """What the DataLoader's pinning thread calls: page-locked copies (the slot is free again at
        once)."""
        return tuple(t.pin_memory() for t in self.take())
