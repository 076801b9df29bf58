"""In-memory labelled image sets (uint8 N x C x H x W) and their fingerprints."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from bctkit.errors import DataError


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 [N, C, H, W] with int64 class labels; ``name`` says where they came from."""

    images: np.ndarray
    labels: np.ndarray
    name: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(
                f"{self.name}: images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{list(self.images.shape)}"
            )
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise DataError(
                f"{self.name}: labels must be 1-D with one label per image "
                f"({len(self.labels)} labels for {len(self.images)} images)"
            )
        if len(self.labels) and self.labels.min() < 0:
            raise DataError(f"{self.name}: labels must be >= 0")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> int:
        return int(self.images.shape[2])

    def subset(self, indices: np.ndarray, labels: np.ndarray | None = None) -> ImageSet:
        """The images at ``indices``, optionally relabelled with ``labels``."""
        idx = np.asarray(indices, dtype=np.int64)
        new_labels = self.labels[idx] if labels is None else np.asarray(labels, dtype=np.int64)
        return ImageSet(self.images[idx], new_labels, self.name)

    def fingerprint(self) -> str:
        """Hash of pixels and labels: identifies exactly this set of images."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1], the network's input convention."""
    x = torch.as_tensor(images)
    return x.float().div_(127.5).sub_(1.0)
