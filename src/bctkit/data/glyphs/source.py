"""The dataset: disjoint training, test and validation characters, each image's face and distortion
copy, and the rendered images as uint8 ``.npy`` with a JSON manifest in the glyphs cache, keyed by
everything that decides a pixel; :func:`load_glyphs` returns the two sources."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

from bctkit.data.glyphs.config import GlyphsConfig, cache_root, digest
from bctkit.data.glyphs.fonts import Face, missing_fonts_error
from bctkit.data.glyphs.jobs import chunks, default_workers, run_jobs
from bctkit.data.glyphs.render import RENDER_VERSION, rasterizer, render_image
from bctkit.data.glyphs.scan import GlyphTable, scan_fonts
from bctkit.data.sources.array import ArraySource
from bctkit.errors import ConfigError, DataError
from bctkit.storage import atomic_path, write_json


def select_identities(table: GlyphTable, cfg: GlyphsConfig, eval_classes: int, validation_classes: int = 0
                      ) -> tuple[list[int], list[int], list[int]]:
    """(training, test, validation characters): disjoint, drawn by ``cfg.seed`` from the eligible
    characters. Training takes the head of one seeded permutation, test its tail and validation the
    characters right after training's, so changing one count leaves the other sets as they were."""
    eligible = table.eligible(cfg.min_faces)
    needed = cfg.num_classes + eval_classes + validation_classes
    if len(eligible) < needed:
        raise missing_fonts_error(len(eligible), needed, cfg, len(table.faces))
    order = np.random.default_rng(cfg.seed).permutation(len(eligible))
    train = [eligible[i] for i in order[: cfg.num_classes]]
    held_out = [eligible[i] for i in order[len(eligible) - eval_classes:]]
    validation = [eligible[i] for i in order[cfg.num_classes: cfg.num_classes + validation_classes]]
    return train, held_out, validation


def image_plan(table: GlyphTable, char: int, count: int, seed: int) -> list[tuple[Face, int]]:
    """(face, augmentation copy) of each of ``char``'s ``count`` images: its distinct faces in a
    seeded order, cycled with a new copy number when ``count`` exceeds them."""
    faces = table.faces_of(char)
    order = np.random.default_rng([seed, char, 1]).permutation(len(faces))
    return [(faces[order[j % len(faces)]], j // len(faces)) for j in range(count)]


def _render_chars(task: tuple[list[tuple[int, list[tuple[Face, int]]]], int, dict[str, float], int]
                  ) -> list[np.ndarray]:
    plans, size, aug, seed = task
    return [np.stack([render_image(face, char, size, aug, seed, copy) for face, copy in plan])
            for char, plan in plans]


def _render_split(table: GlyphTable, cfg: GlyphsConfig, split: str, chars: list[int], per_class: int,
                  progress: bool, workers: int | None) -> tuple[np.ndarray, str]:
    """uint8 [len(chars) * per_class, 1, size, size] images of ``chars``, memory-mapped from the
    cache (rendered and cached first when no entry's manifest matches): a cold and a warm load read
    the same file."""
    plans = [(c, image_plan(table, c, per_class, cfg.seed)) for c in chars]
    aug = cfg.augmentation()
    key = digest({
        "version": RENDER_VERSION, "rasterizer": rasterizer(), "fonts": table.fonts, "scan": table.key,
        "size": cfg.size, "seed": cfg.seed, "augmentation": aug,
        "plans": [[c, [[f.key, k] for f, k in plan]] for c, plan in plans],
    })
    root = cache_root(cfg)
    images_path, manifest_path = root / f"{split}-{key}.npy", root / f"{split}-{key}.json"
    shape = (len(chars) * per_class, 1, cfg.size, cfg.size)
    images = _read_images(images_path, manifest_path, key, shape)
    if images is not None:
        return images, key
    tasks = [(part, cfg.size, aug, cfg.seed) for part in chunks(plans, 64)]
    sizes = [len(part) * per_class for part in chunks(plans, 64)]
    stacks = run_jobs(_render_chars, tasks, sizes, workers or default_workers(), f"glyphs: render {split}",
                      progress)
    rendered = np.concatenate(stacks)[:, None] if stacks else np.zeros(shape, np.uint8)
    with atomic_path(images_path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, rendered)
    write_json(manifest_path, {
        "key": key, "split": split, "shape": list(shape), "images_per_class": per_class,
        "size": cfg.size, "seed": cfg.seed, "augmentation": aug, "fonts": table.fonts, "scan": table.key,
        "rasterizer": rasterizer(), "version": RENDER_VERSION,
        "characters": [chr(c) for c in chars],
        "faces": sorted({f.key for _, plan in plans for f, _ in plan}),
    })
    images = _read_images(images_path, manifest_path, key, shape)
    if images is None:
        raise DataError(f"glyphs: the image cache {images_path} is unreadable right after writing it")
    return images, key


def _read_images(images_path: Path, manifest_path: Path, key: str, shape: tuple[int, ...]
                 ) -> np.ndarray | None:
    if not (images_path.is_file() and manifest_path.is_file()):
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        images = np.load(images_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        warnings.warn(f"glyphs: ignoring corrupt image cache {images_path} ({exc})", stacklevel=3)
        return None
    if manifest.get("key") != key or images.shape != shape or images.dtype != np.uint8:
        return None
    return images


def load_glyphs(cfg: GlyphsConfig, eval_classes: int, eval_images_per_class: int, *, progress: bool = True,
                workers: int | None = None, validation_classes: int = 0,
                split: Literal["test", "validation"] = "test") -> tuple[ArraySource, ArraySource]:
    """(training pool, evaluation set) of the glyphs dataset; their characters are disjoint and
    both are labelled from 0. The evaluation set is the test characters, or with ``split=
    "validation"`` the ``validation_classes`` characters kept apart from both for choosing settings
    (``eval_images_per_class`` images each, like the test set). ``workers``: render processes
    (default min(2, CPUs))."""
    if split == "validation" and validation_classes < 2:
        raise ConfigError(f"glyphs: split={split!r} needs validation_classes >= 2, got {validation_classes}")
    table = scan_fonts(cfg, progress=progress, workers=workers)
    train, test, validation = select_identities(table, cfg, eval_classes, validation_classes)
    held_out = validation if split == "validation" else test
    pool, pool_key = _render_split(table, cfg, "train", train, cfg.images_per_class, progress, workers)
    name = "eval" if split == "test" else split  # the test set's cache files and name predate the split
    ev, ev_key = _render_split(table, cfg, name, held_out, eval_images_per_class, progress, workers)
    return (
        ArraySource(pool, np.repeat(np.arange(len(train), dtype=np.int64), cfg.images_per_class),
                    f"glyphs train pool ({len(train)} characters, seed {cfg.seed}, {pool_key[:8]})",
                    identity={"format": "glyphs", "render_key": pool_key}),
        ArraySource(ev, np.repeat(np.arange(len(held_out), dtype=np.int64), eval_images_per_class),
                    f"glyphs {name} ({len(held_out)} characters, seed {cfg.seed}, {ev_key[:8]})",
                    identity={"format": "glyphs", "render_key": ev_key}),
    )
