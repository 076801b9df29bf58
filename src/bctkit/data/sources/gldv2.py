"""``gldv2``: the Google Landmarks Dataset v2 clean training set.

Images are ``<root>/train/a/b/c/abcdef....jpg``: the image id's first three characters are folders.
Labels come from ``train_clean.csv`` (header ``landmark_id,images``, rows ``landmark_id,id1 id2
...``): each row's images get that landmark, and landmark ids become labels 0..L-1 in increasing
landmark id order; :meth:`GLDv2Source.label_name` gives the original landmark id. Images are in the
csv's order. The ``path label`` list that the UniBCT / OpenCompatible code ships for GLDv2 needs no
source of its own: it is the ``list`` source with ``root`` set to the folder its paths start from
(``{file: gldv2_train.txt, root: /data/gldv2}``).

Every image is checked to exist (a stat, no decoding) when the csv is parsed; the parse is cached
by the csv's size, mtime and edges and by ``root``, like a list file's. A row without images, a
landmark id that is not a non-negative integer, an image id that cannot name a file, an image or a
landmark listed twice, and a missing image are one-line DataErrors naming ``file:line``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from bctkit.data.sources.base import PathSource, PathTable, listed_file_size
from bctkit.data.sources.scan_cache import cached_scan
from bctkit.errors import DataError

__all__ = ["GLDv2Config", "GLDv2Source", "parse_clean_csv"]

SCAN_VERSION = 1
_IMAGE_ID = re.compile(r"[0-9A-Za-z]{3,}")


class GLDv2Config(BaseModel):
    """``data.gldv2`` / ``data.eval.gldv2``: ``root`` holds ``train/``; ``csv`` defaults to
    ``<root>/train_clean.csv``."""

    model_config = ConfigDict(extra="forbid")

    root: str
    csv: str | None = None


def image_path(image_id: str) -> str:
    """Where image ``image_id`` is, relative to the dataset root."""
    return f"train/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def parse_clean_csv(file: Path, root: Path) -> dict[str, np.ndarray]:
    """Parse ``train_clean.csv`` into arrays (path blob + offsets, labels, file sizes, the sorted
    landmark ids), checking every image exists under ``root``."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    paths: list[str] = []
    landmarks: list[int] = []
    sizes: list[int] = []
    first_row: dict[int, int] = {}
    image_row: dict[str, int] = {}
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or (lineno == 1 and line.replace(" ", "") == "landmark_id,images"):
            continue
        landmark_text, _, images_text = line.partition(",")
        landmark_text = landmark_text.strip()
        if not (landmark_text.isascii() and landmark_text.isdigit()):
            raise DataError(f"{file}:{lineno}: landmark id {landmark_text!r} is not a non-negative integer")
        landmark = int(landmark_text)
        if landmark in first_row:
            raise DataError(f"{file}:{lineno}: landmark {landmark} is listed again (first on line "
                            f"{first_row[landmark]})")
        first_row[landmark] = lineno
        ids = images_text.split()
        if not ids:
            raise DataError(f"{file}:{lineno}: landmark {landmark} has no images")
        for image_id in ids:
            if not _IMAGE_ID.fullmatch(image_id):
                raise DataError(f"{file}:{lineno}: image id {image_id!r} is not 3 or more letters and digits")
            if image_id in image_row:
                raise DataError(f"{file}:{lineno}: image {image_id} is listed again (first on line "
                                f"{image_row[image_id]})")
            image_row[image_id] = lineno
            rel = image_path(image_id)
            sizes.append(listed_file_size(root / rel, f"{file}:{lineno}"))
            paths.append(rel)
            landmarks.append(landmark)
    if not paths:
        raise DataError(f"{file}: no 'landmark_id,images' rows")
    table = PathTable.from_paths(paths)
    ordered, labels = np.unique(np.asarray(landmarks, dtype=np.int64), return_inverse=True)
    return {"blob": table.blob, "offsets": table.offsets, "labels": labels.astype(np.int64),
            "sizes": np.asarray(sizes, dtype=np.int64), "landmarks": ordered}


class GLDv2Source(PathSource):
    """See the module docstring. ``landmarks``: the landmark id of each label (sorted)."""

    format = "gldv2"

    def __init__(self, root: str | os.PathLike[str], csv: str | os.PathLike[str] | None = None,
                 name: str | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        if not (self.root / "train").is_dir():
            raise DataError(f"{self.root}: no train/ folder (gldv2.root holds train/a/b/c/<id>.jpg)")
        self.file = self.root / "train_clean.csv" if csv is None else Path(csv).expanduser()
        if not self.file.is_file():
            raise DataError(f"{self.file}: not found (gldv2.csv, the landmark_id,images table)")
        params = {"version": SCAN_VERSION, "root": str(self.root)}
        arrays, self.from_cache = cached_scan("gldv2", [self.file], params,
                                              lambda: parse_clean_csv(self.file, self.root))
        self.landmarks = arrays["landmarks"]
        super().__init__(self.root, PathTable(arrays["blob"], arrays["offsets"]), arrays["sizes"],
                         arrays["labels"], name or f"gldv2 {self.file.name}")

    def label_name(self, label: int) -> str:
        return str(int(self.landmarks[label])) if 0 <= label < len(self.landmarks) else str(label)
