"""In-memory (or memory-mapped) image sets: the embedded ``synthetic`` and ``glyphs`` datasets, and any
uint8 array a library user hands over. The fast path of the source interface: a batch is one
fancy-indexing read, and nothing is decoded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bctkit.data.sources.base import DataSource, check_labels, hash_array
from bctkit.errors import DataError

__all__ = ["ArraySource"]


class ArraySource(DataSource):
    """Images as uint8 [N, C, H, W] with int labels. ``identity`` describes where the pixels come from
    (a generator's settings, a render cache's key); without one the pixels themselves are hashed,
    which is only for small arrays a caller builds by hand. ``images`` may be a read-only memmap:
    it is reopened (not copied) in DataLoader workers."""

    reads_batches = True

    def __init__(self, images: np.ndarray, labels: Any, name: str = "array",
                 identity: dict[str, Any] | None = None) -> None:
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8:
            desc = f"{images.dtype} {list(images.shape)}" if isinstance(images, np.ndarray) else type(images)
            raise DataError(f"{name}: images must be uint8 [N, C, H, W], got {desc}")
        self.images = images
        self._labels = check_labels(labels, name)
        if len(self._labels) != len(images):
            raise DataError(f"{name}: labels must be 1-D with one label per image "
                            f"({len(self._labels)} labels for {len(images)} images)")
        self.name = name
        self._identity = identity

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> int:
        return int(self.images.shape[2])

    def read(self, i: int) -> np.ndarray:
        return np.asarray(self.images[i])

    def read_many(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self.images[np.asarray(indices, dtype=np.int64)])

    def identity(self) -> dict[str, Any]:
        if self._identity is not None:
            return self._identity
        return {"format": "array", "pixels": hash_array(self.images)[:32]}

    def describe(self, i: int) -> str:
        return f"{self.name} image {i}"

    def stored_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if isinstance(self.images, np.memmap) and self.images.filename is not None:
            mm = self.images
            state["images"] = ("memmap", mm.filename, mm.offset, mm.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        images = state["images"]
        if isinstance(images, tuple):
            _, filename, offset, shape = images
            state["images"] = np.memmap(Path(filename), dtype=np.uint8, mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)
