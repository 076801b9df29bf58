"""Tiny datasets built on the fly: the same encoded images laid out as an image folder, a list file
and (where the test asks) a RecordIO pair."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def encoded_images(identities: int = 3, per_identity: int = 4, size: tuple[int, int] = (10, 12),
                   seed: int = 0) -> list[tuple[int, str, bytes]]:
    """(label, file name, encoded bytes): PNG and JPEG files, RGB and one grey PNG per identity."""
    rng = np.random.default_rng(seed)
    out = []
    for label in range(identities):
        for j in range(per_identity):
            fmt = "PNG" if j % 2 == 0 else "JPEG"
            grey = j == 2
            shape = size if grey else (*size, 3)
            img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "L" if grey else "RGB")
            buf = io.BytesIO()
            img.save(buf, fmt)
            out.append((label, f"img{j}.{'png' if fmt == 'PNG' else 'jpg'}", buf.getvalue()))
    return out


def write_folder(root: Path, items: list[tuple[int, str, bytes]], names: list[str] | None = None) -> Path:
    """root/<identity>/<file> for every item; identity folders named ``names`` (default id00, ...)."""
    for label, fname, data in items:
        folder = root / (names[label] if names else f"id{label:02d}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / fname).write_bytes(data)
    return root


def decoded(data: bytes) -> np.ndarray:
    """What Pillow decodes from ``data``, as uint8 [C, H, W] (grey stays one channel)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    arr = np.asarray(img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@pytest.fixture
def items() -> list[tuple[int, str, bytes]]:
    return encoded_images()


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Scan caches go to a temporary folder, never to the user's ~/.cache."""
    monkeypatch.setenv("BCTKIT_CACHE", str(tmp_path_factory.mktemp("bctkit-cache")))
