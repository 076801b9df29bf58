"""``imagefolder``: ``root/<identity>/<image>``, the layout of torchvision's ImageFolder and of most
face and re-identification datasets unpacked to disk.

Identities are the folders directly under ``root`` in sorted order (label k = k-th folder); an
identity's images are the files below its folder (subfolders included) whose extension Pillow
reads, in sorted order. Hidden files and folders (names starting with ".") are ignored. The listing
is made once per run (a stat per file, no decoding); the source's identity is a hash of the relative
paths, file sizes and labels, so moving the dataset does not change it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from bctkit.data.sources.base import PathSource, PathTable
from bctkit.errors import DataError

__all__ = ["ImageFolderConfig", "ImageFolderSource", "image_extensions"]


class ImageFolderConfig(BaseModel):
    """``data.imagefolder`` / ``data.eval.imagefolder``."""

    model_config = ConfigDict(extra="forbid")

    root: str


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions Pillow can open on this machine (.jpg, .png, .webp, ...)."""
    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())


class ImageFolderSource(PathSource):
    """See the module docstring."""

    format = "imagefolder"

    def __init__(self, root: str | os.PathLike[str], name: str | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder not found (data.imagefolder.root)")
        exts = image_extensions()
        classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DataError(f"{self.root}: no identity folders; expected root/<identity>/<image>")
        paths: list[str] = []
        sizes: list[int] = []
        counts: list[int] = []
        for cls in classes:
            found = 0
            for dirpath, dirnames, filenames in os.walk(self.root / cls, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel = Path(dirpath).relative_to(self.root).as_posix()
                for fname in sorted(filenames):
                    if fname.startswith(".") or os.path.splitext(fname)[1].lower() not in exts:
                        continue
                    paths.append(f"{rel}/{fname}")
                    sizes.append(os.stat(os.path.join(dirpath, fname)).st_size)
                    found += 1
            if not found:
                raise DataError(f"{self.root / cls}: identity folder with no images (extensions Pillow "
                                f"reads: {', '.join(sorted(e for e in exts if len(e) <= 5)[:12])} ...)")
            counts.append(found)
        self.classes = classes
        super().__init__(self.root, PathTable.from_paths(paths), np.asarray(sizes),
                         np.repeat(np.arange(len(classes), dtype=np.int64), counts),
                         name or f"imagefolder {self.root.name}")

    def label_name(self, label: int) -> str:
        return self.classes[label] if 0 <= label < len(self.classes) else str(label)
