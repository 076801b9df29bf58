"""The font scan: which installed faces really draw which candidate characters, and which of those
drawings are distinct; cached under the glyphs cache, keyed by the font files' path, size and mtime,
the character ranges, ``min_faces``, the threshold and the rasteriser version."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from bctkit.data.glyphs.config import GlyphsConfig, cache_root, digest
from bctkit.data.glyphs.fonts import DEFAULT_FONT_DIRS, Face, find_font_files, fonts_fingerprint, read_faces
from bctkit.data.glyphs.jobs import chunks, default_workers, run_jobs
from bctkit.data.glyphs.render import rasterizer, render_clean
from bctkit.storage import write_json

SCAN_VERSION = 1
"""Bump this when a code change alters the scan's verdicts (it keys the scan cache)."""
SCAN_SIZE = 32
"""Side of the un-augmented rendering on which two faces' drawings of a character are compared."""
SCAN_MARGIN = 1 / 16
MISSING_CODEPOINT = 0x10FFFD
"""A private-use code point no face draws: its rendering is the face's tofu (or nothing)."""


@dataclass(frozen=True)
class GlyphTable:
    """The font scan: the usable faces and, per character, the faces that draw it distinctly
    (one face per group of near-identical drawings). ``distinct[i]`` belongs to ``chars[i]``."""

    faces: tuple[Face, ...]
    chars: tuple[int, ...]
    distinct: tuple[tuple[int, ...], ...]
    fonts: str
    key: str

    def eligible(self, min_faces: int) -> list[int]:
        """Characters with at least ``min_faces`` distinct faces, in code point order."""
        return [c for c, fs in zip(self.chars, self.distinct, strict=True) if len(fs) >= min_faces]

    @cached_property
    def _position(self) -> dict[int, int]:
        return {c: i for i, c in enumerate(self.chars)}

    def faces_of(self, char: int) -> tuple[Face, ...]:
        """The distinct faces of ``char`` (empty when it was not a candidate)."""
        pos = self._position.get(char)
        return () if pos is None else tuple(self.faces[i] for i in self.distinct[pos])


def _blurred(img: np.ndarray) -> np.ndarray:
    """The scan's comparison image: a sigma-1 blur forgives one-pixel hinting differences."""
    blurred = Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.0))
    return np.asarray(blurred, dtype=np.float32) / 255.0


def _distinct_faces(task: tuple[list[Face], list[tuple[int, list[int]]], float]) -> list[tuple[int, ...]]:
    """For each (char, covering face ids): the faces that draw it distinctly, in face order.

    A face's drawing counts when it has ink, differs from the face's tofu, and differs from every
    drawing already kept for the character by more than ``threshold`` (mean absolute difference of
    blurred renderings); near-identical drawings (regional variants, derived fonts) count once."""
    faces, items, threshold = task
    tofu: dict[int, np.ndarray | None] = {}
    out = []
    for char, ids in items:
        kept: list[int] = []
        reps: list[np.ndarray] = []
        for fid in ids:
            img = render_clean(faces[fid], char, SCAN_SIZE, SCAN_MARGIN)
            if img is None:
                continue
            cur = _blurred(img)
            if fid not in tofu:
                missing = render_clean(faces[fid], MISSING_CODEPOINT, SCAN_SIZE, SCAN_MARGIN)
                tofu[fid] = None if missing is None else _blurred(missing)
            ref = tofu[fid]
            if ref is not None and np.abs(cur - ref).mean() <= threshold:
                continue
            if all(np.abs(cur - r).mean() > threshold for r in reps):
                kept.append(fid)
                reps.append(cur)
        out.append(tuple(kept))
    return out


def scan_fonts(cfg: GlyphsConfig, *, progress: bool = True, workers: int | None = None) -> GlyphTable:
    """Which installed faces draw which candidate characters distinctly; cached by font files,
    character ranges, ``min_faces``, ``distinct_threshold`` and the rasteriser version."""
    dirs = list(cfg.font_dirs) if cfg.font_dirs is not None else list(DEFAULT_FONT_DIRS)
    files = find_font_files(dirs)
    fonts = fonts_fingerprint(files)
    ranges = cfg.ranges()
    key = digest({"version": SCAN_VERSION, "fonts": fonts, "ranges": ranges, "min_faces": cfg.min_faces,
                   "threshold": cfg.distinct_threshold, "rasterizer": rasterizer()})
    path = cache_root(cfg) / f"scan-{key}.json"
    cached = _read_scan(path, key)
    if cached is not None:
        return cached
    faces: list[Face] = []
    coverage: list[np.ndarray] = []
    for file in files:
        for face, cps in read_faces(file, ranges):
            faces.append(face)
            coverage.append(cps)
    counts: dict[int, list[int]] = {}
    for fid, cps in enumerate(coverage):
        for c in cps.tolist():
            counts.setdefault(c, []).append(fid)
    items = sorted((c, ids) for c, ids in counts.items() if len(ids) >= cfg.min_faces)
    tasks = [(faces, part, cfg.distinct_threshold) for part in chunks(items, 256)]
    sizes = [sum(len(ids) for _, ids in part) for part in chunks(items, 256)]
    distinct = run_jobs(_distinct_faces, tasks, sizes, workers or default_workers(), "glyphs: font scan",
                        progress)
    table = GlyphTable(tuple(faces), tuple(c for c, _ in items), tuple(distinct), fonts, key)
    write_json(path, {
        "key": key, "fonts": fonts, "font_dirs": dirs,
        "faces": [[f.path, f.index, f.name] for f in faces],
        "chars": list(table.chars), "distinct": [list(d) for d in distinct],
    })
    return table


def _read_scan(path: Path, key: str) -> GlyphTable | None:
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw["key"] != key:
            return None
        faces = tuple(Face(p, int(i), n) for p, i, n in raw["faces"])
        return GlyphTable(faces, tuple(int(c) for c in raw["chars"]),
                          tuple(tuple(int(f) for f in d) for d in raw["distinct"]), raw["fonts"], key)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"glyphs: ignoring corrupt scan cache {path} ({exc})", stacklevel=3)
        return None
