"""The ``glyphs`` dataset: CJK characters rendered by installed font faces, an offline open-set benchmark.

An identity is one CJK character; an image is that character drawn by one font face under a seeded
random distortion (affine geometry, stroke thickness, blur, occlusion, noise). Like faces in face
recognition there are many identities with few images each, real variation inside an identity (the
faces are different designs: Ming, Kai, Hei, brush, handwriting ...) and evaluation identities that no
training image shows. Everything is made from the fonts on this machine; ``scripts/setup.sh`` installs
:data:`FONT_PACKAGES` from Debian.

Two caches under ``<cache_dir>/glyphs`` make a second load take seconds: the font scan (which faces
really draw which characters, and which of those drawings are distinct), keyed by the font files'
path, size and mtime; and the rendered uint8 images as ``.npy`` with a JSON manifest, keyed by
everything that decides a pixel. Both are written atomically.

Images are white ink on black, uint8 ``[N, 1, size, size]``; labels are ``0..C-1`` with
``images_per_class`` consecutive images per class.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter, ImageFont, features
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from bctkit.data.sources.array import ArraySource
from bctkit.errors import ConfigError, DataError
from bctkit.storage import atomic_path, cache_home, write_json

FONT_PACKAGES: tuple[str, ...] = (
    "fonts-arphic-bkai00mp",
    "fonts-arphic-bsmi00lp",
    "fonts-arphic-gbsn00lp",
    "fonts-arphic-gkai00mp",
    "fonts-cwtex-fs",
    "fonts-cwtex-heib",
    "fonts-cwtex-ming",
    "fonts-cwtex-yen",
    "fonts-dejima-mincho",
    "fonts-horai-umefont",
    "fonts-konatu",
    "fonts-mona",
    "fonts-morisawa-bizud-mincho",
    "fonts-motoya-l-cedar",
    "fonts-sawarabi-gothic",
    "fonts-sawarabi-mincho",
    "fonts-seto",
    "fonts-smiley-sans",
    "fonts-vlgothic",
    "fonts-wqy-microhei",
    "fonts-wqy-zenhei",
)
"""Debian packages whose faces give the default benchmark (see docs/glyphs.md for the choice)."""

DEFAULT_FONT_DIRS: tuple[str, ...] = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts")
FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
SCAN_VERSION = 1
RENDER_VERSION = 1
"""Bump these when a code change alters the scan's verdicts or an image's pixels (they key the caches)."""
SCAN_SIZE = 32
"""Side of the un-augmented rendering on which two faces' drawings of a character are compared."""
SCAN_MARGIN = 1 / 16
MISSING_CODEPOINT = 0x10FFFD
"""A private-use code point no face draws: its rendering is the face's tofu (or nothing)."""
MIN_RASTER_PX = 96
SERIAL_BELOW = 4096
"""Jobs with fewer items than this run in-process (starting worker processes costs seconds)."""

T = TypeVar("T")
R = TypeVar("R")


def _parse_range(text: str) -> tuple[int, int]:
    parts = text.upper().replace("U+", "").split("-")
    try:
        lo, hi = (int(parts[0], 16), int(parts[-1], 16)) if len(parts) in (1, 2) else (-1, -1)
    except ValueError:
        lo, hi = -1, -1
    if not 0 <= lo <= hi <= 0x10FFFF:
        raise ValueError(f"character range {text!r} is not 'XXXX-YYYY' (hex code points, low <= high)")
    return lo, hi


class GlyphsConfig(BaseModel):
    """Options of the ``glyphs`` dataset. Evaluation identities and their image count are
    ``DataConfig.eval_classes`` / ``eval_images_per_class``. When an identity needs more images
    than it has distinct faces, faces are reused with further augmentation copies (image ``j`` of a
    character uses its ``j mod F``-th face in a seeded order, copy ``j div F``)."""

    model_config = ConfigDict(extra="forbid")

    num_classes: int = Field(3000, ge=2, description="characters in the training pool")
    images_per_class: int = Field(15, ge=1)
    size: int = Field(32, ge=8, le=256)
    min_faces: int = Field(15, ge=1, description="distinct faces a character needs to be used")
    seed: int = 0
    char_ranges: list[str] = Field(
        default_factory=lambda: ["4E00-9FFF"], min_length=1,
        description="candidate characters, hex code point ranges (default: CJK Unified Ideographs)",
    )
    font_dirs: list[str] | None = Field(None, description="folders searched for fonts (None: system)")
    cache_dir: str | None = Field(None, description="None: $BCTKIT_CACHE, else ~/.cache/bctkit")
    distinct_threshold: float = Field(
        0.05, gt=0, lt=1,
        description="two faces draw a character differently when their blurred un-augmented "
                    "renderings differ by more than this mean absolute difference (0..1)",
    )
    margin: float = Field(0.1, ge=0, lt=0.4, description="border around the glyph, fraction of size")
    rotation_deg: float = Field(8.0, ge=0, le=90)
    scale: float = Field(0.1, ge=0, le=0.5, description="log-uniform size jitter")
    aspect: float = Field(0.08, ge=0, le=0.5, description="log-uniform width/height jitter")
    shear_deg: float = Field(8.0, ge=0, le=45)
    translate: float = Field(0.05, ge=0, le=0.3, description="shift, fraction of size")
    stroke_prob: float = Field(0.5, ge=0, le=1, description="chance of thicker or thinner strokes")
    blur: float = Field(0.7, ge=0, le=5, description="largest Gaussian blur sigma, output pixels")
    noise: float = Field(0.05, ge=0, le=1, description="Gaussian pixel noise sigma, fraction of 255")
    occlusion_prob: float = Field(0.25, ge=0, le=1)
    occlusion_size: float = Field(0.35, ge=0.1, le=1, description="largest erased box side, fraction")

    @field_validator("char_ranges")
    @classmethod
    def _check_ranges(cls, value: list[str]) -> list[str]:
        for text in value:
            _parse_range(text)
        return value

    def ranges(self) -> list[tuple[int, int]]:
        """The candidate ranges as inclusive (low, high) code points."""
        return [_parse_range(text) for text in self.char_ranges]

    def augmentation(self) -> dict[str, float]:
        """The options that decide an image's distortion (they key the render cache)."""
        names = ("margin", "rotation_deg", "scale", "aspect", "shear_deg", "translate", "stroke_prob",
                 "blur", "noise", "occlusion_prob", "occlusion_size")
        return {name: float(getattr(self, name)) for name in names}


@dataclass(frozen=True)
class Face:
    """One face of a font file (a collection .ttc holds several)."""

    path: str
    index: int
    name: str

    @property
    def key(self) -> str:
        """Machine-independent identity of the face (file name, not folder)."""
        return f"{Path(self.path).name}#{self.index}"

    @property
    def seed_part(self) -> int:
        """A stable 32-bit number for the face, mixed into each image's random seed."""
        return int(hashlib.sha256(self.key.encode()).hexdigest()[:8], 16)


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


def cache_root(cfg: GlyphsConfig) -> Path:
    """Where the glyph caches live: ``cfg.cache_dir``, else $BCTKIT_CACHE, else ~/.cache/bctkit."""
    return (Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_home()) / "glyphs"


def find_font_files(dirs: Iterable[str]) -> list[Path]:
    """Font files under ``dirs`` (recursively), symlinks resolved and duplicates dropped, sorted."""
    found: set[Path] = set()
    for d in dirs:
        root = Path(d).expanduser()
        if not root.is_dir():
            continue
        for dirpath, _, names in os.walk(root, followlinks=True):
            for name in names:
                if name.lower().endswith(FONT_SUFFIXES):
                    path = Path(dirpath, name).resolve()
                    if path.is_file():
                        found.add(path)
    return sorted(found)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def fonts_fingerprint(files: Iterable[Path]) -> str:
    """Hash of the font files' paths, sizes and modification times (a changed font rescans)."""
    stats = []
    for path in files:
        st = path.stat()
        stats.append([str(path), st.st_size, st.st_mtime_ns])
    return _digest(stats)


def _rasterizer() -> str:
    """Pillow and FreeType versions: another rasteriser may draw other pixels."""
    return f"pillow {PIL.__version__} freetype {features.version('freetype2')}"


@contextmanager
def _quiet_fonttools() -> Iterator[None]:
    log = logging.getLogger("fontTools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def read_faces(path: Path, ranges: Sequence[tuple[int, int]]) -> list[tuple[Face, np.ndarray]]:
    """The faces of one font file with the code points in ``ranges`` that their cmap maps.

    A file that fontTools or FreeType cannot read is skipped with a warning (returns [])."""
    from fontTools.ttLib import TTCollection, TTFont

    out: list[tuple[Face, np.ndarray]] = []
    try:
        with _quiet_fonttools():
            if path.suffix.lower() in (".ttc", ".otc"):
                fonts = TTCollection(str(path), lazy=True).fonts
            else:
                fonts = [TTFont(str(path), lazy=True)]
            for index, font in enumerate(fonts):
                cmap = font.getBestCmap() or {}
                cps = np.fromiter((c for c in cmap if any(lo <= c <= hi for lo, hi in ranges)), np.int64)
                if not len(cps):
                    continue
                name = font["name"].getDebugName(4) if "name" in font else None
                ImageFont.truetype(str(path), MIN_RASTER_PX, index=index)
                out.append((Face(str(path), index, name or f"{path.name}#{index}"), np.sort(cps)))
    except Exception as exc:  # fontTools and FreeType raise many types; any of them means unusable
        warnings.warn(f"glyphs: skipping unreadable font {path}: {type(exc).__name__}: {exc}", stacklevel=2)
        return []
    return out


_FONTS: dict[tuple[str, int, int], ImageFont.FreeTypeFont] = {}


def _font(face: Face, px: int) -> ImageFont.FreeTypeFont:
    """The face at pixel size ``px``, opened once per process."""
    key = (face.path, face.index, px)
    if key not in _FONTS:
        _FONTS[key] = ImageFont.truetype(face.path, px, index=face.index)
    return _FONTS[key]


def _raster_px(size: int) -> int:
    return max(MIN_RASTER_PX, 3 * size)


def glyph_ink(face: Face, char: int, px: int) -> Image.Image | None:
    """The glyph of ``char`` drawn at ``px`` pixels, cropped to its ink; None when the face draws
    nothing (or FreeType fails on it, as some broken hinting programs make it do)."""
    font = _font(face, px)
    text = chr(char)
    try:
        x0, y0, x1, y1 = font.getbbox(text)
        if x1 <= x0 or y1 <= y0:
            return None
        img = Image.new("L", (x1 - x0, y1 - y0), 0)
        ImageDraw.Draw(img).text((-x0, -y0), text, font=font, fill=255)
    except OSError:
        return None
    box = img.getbbox()
    return None if box is None else img.crop(box)


def _centred(ink: Image.Image, side: int, margin: float) -> Image.Image:
    """``ink`` scaled to fit a ``side`` square less ``margin`` on each side, centred, aspect kept."""
    w, h = ink.size
    box = max(1.0, side * (1.0 - 2.0 * margin))
    scale = box / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = Image.new("L", (side, side), 0)
    out.paste(ink.resize((nw, nh), Image.Resampling.LANCZOS), ((side - nw) // 2, (side - nh) // 2))
    return out


def render_clean(face: Face, char: int, size: int, margin: float) -> np.ndarray | None:
    """The un-augmented image of ``char`` in ``face``: uint8 [size, size], white ink on black,
    centred with ``margin``; None when the face draws nothing. It equals :func:`render_image` with
    every augmentation strength at zero."""
    ink = glyph_ink(face, char, _raster_px(size))
    if ink is None:
        return None
    work = _centred(ink, 2 * size, margin)
    return np.asarray(work.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def _affine(rng: np.random.Generator, aug: dict[str, float], side: int) -> tuple[float, ...]:
    """PIL AFFINE coefficients (output -> input) of a random rotation, shear, scale and shift."""
    theta = math.radians(rng.uniform(-1, 1) * aug["rotation_deg"])
    shear = math.radians(rng.uniform(-1, 1) * aug["shear_deg"])
    s = math.exp(rng.uniform(-1, 1) * aug["scale"])
    a = math.exp(rng.uniform(-1, 1) * aug["aspect"])
    tx, ty = rng.uniform(-1, 1, 2) * aug["translate"] * side
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    fwd = rot @ np.array([[1.0, math.tan(shear)], [0.0, 1.0]]) @ np.diag([s * a, s / a])
    inv = np.linalg.inv(fwd)
    c = (side - 1) / 2.0
    offset = np.array([c, c]) - inv @ np.array([c + tx, c + ty])
    return (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])


def render_image(face: Face, char: int, size: int, aug: dict[str, float], seed: int, copy: int) -> np.ndarray:
    """One dataset image: ``char`` in ``face`` under a distortion drawn from (seed, char, face,
    copy) only. Geometry and stroke changes act on a 2x supersampled canvas, then the image is
    reduced to ``size``, partly erased, blurred and given pixel noise."""
    ink = glyph_ink(face, char, _raster_px(size))
    if ink is None:
        raise DataError(f"glyphs: {face.name} no longer draws U+{char:04X}; delete the glyph cache")
    rng = np.random.default_rng([seed, char, face.seed_part, copy])
    side = 2 * size
    work = _centred(ink, side, aug["margin"])
    coeffs = _affine(rng, aug, side)
    if any(aug[k] > 0 for k in ("rotation_deg", "shear_deg", "scale", "aspect", "translate")):
        work = work.transform((side, side), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    stroke, thicker = rng.random() < aug["stroke_prob"], rng.random() < 0.5
    if stroke:
        changed = work.filter(ImageFilter.MaxFilter(3) if thicker else ImageFilter.MinFilter(3))
        before = np.asarray(work, dtype=np.float64).sum()
        if thicker or np.asarray(changed, dtype=np.float64).sum() >= 0.5 * before:
            work = changed
    img = work.resize((size, size), Image.Resampling.BOX)
    occlude, (ow, oh), (ox, oy) = rng.random() < aug["occlusion_prob"], rng.uniform(0.15, 1, 2), rng.random(2)
    if occlude:
        w = max(1, round(ow * aug["occlusion_size"] * size))
        h = max(1, round(oh * aug["occlusion_size"] * size))
        x, y = round(ox * (size - w)), round(oy * (size - h))
        img.paste(0, (x, y, x + w, y + h))
    sigma = rng.uniform(0, aug["blur"])
    if sigma > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(sigma))
    out = np.asarray(img, dtype=np.float32)
    if aug["noise"] > 0:
        out = out + rng.normal(0.0, aug["noise"] * 255.0, out.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


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


def _run(fn: Callable[[T], list[R]], tasks: list[T], sizes: list[int], workers: int, desc: str,
         progress: bool) -> list[R]:
    """``fn`` over ``tasks`` (each yielding a list), concatenated in order, with a tqdm bar counting
    items. Large jobs run in ``workers`` forked processes where fork exists (Linux); forking needs
    no ``__main__`` guard in the caller's script, and the workers touch neither torch nor the
    parent's open fonts (they reopen their own, so no file offset is shared)."""
    results: list[R] = []
    with tqdm(total=sum(sizes), desc=desc, unit="img", disable=not progress or not sum(sizes)) as bar:
        forkable = sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods()
        if not forkable or workers <= 1 or sum(sizes) < SERIAL_BELOW or len(tasks) < 2:
            for task, n in zip(tasks, sizes, strict=True):
                results.extend(fn(task))
                bar.update(n)
            return results
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_FONTS.clear) as pool:
            for part, n in zip(pool.map(fn, tasks), sizes, strict=True):
                results.extend(part)
                bar.update(n)
    return results


def _chunks(items: list[T], n: int) -> list[list[T]]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def _default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def scan_fonts(cfg: GlyphsConfig, *, progress: bool = True, workers: int | None = None) -> GlyphTable:
    """Which installed faces draw which candidate characters distinctly; cached by font files,
    character ranges, ``min_faces``, ``distinct_threshold`` and the rasteriser version."""
    dirs = list(cfg.font_dirs) if cfg.font_dirs is not None else list(DEFAULT_FONT_DIRS)
    files = find_font_files(dirs)
    fonts = fonts_fingerprint(files)
    ranges = cfg.ranges()
    key = _digest({"version": SCAN_VERSION, "fonts": fonts, "ranges": ranges, "min_faces": cfg.min_faces,
                   "threshold": cfg.distinct_threshold, "rasterizer": _rasterizer()})
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
    tasks = [(faces, part, cfg.distinct_threshold) for part in _chunks(items, 256)]
    sizes = [sum(len(ids) for _, ids in part) for part in _chunks(items, 256)]
    distinct = _run(_distinct_faces, tasks, sizes, workers or _default_workers(), "glyphs: font scan",
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


def missing_fonts_error(found: int, needed: int, cfg: GlyphsConfig, faces: int) -> DataError:
    """The one-line error for too few usable characters, naming the Debian packages to install."""
    dirs = cfg.font_dirs if cfg.font_dirs is not None else list(DEFAULT_FONT_DIRS)
    return DataError(
        f"glyphs: found {found} characters drawn by >= {cfg.min_faces} distinct font faces "
        f"({faces} CJK faces in {', '.join(dirs)}), need {needed}; install the Debian packages: "
        f"apt-get install {' '.join(FONT_PACKAGES)} (scripts/setup.sh does this)"
    )


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
    key = _digest({
        "version": RENDER_VERSION, "rasterizer": _rasterizer(), "fonts": table.fonts, "scan": table.key,
        "size": cfg.size, "seed": cfg.seed, "augmentation": aug,
        "plans": [[c, [[f.key, k] for f, k in plan]] for c, plan in plans],
    })
    root = cache_root(cfg)
    images_path, manifest_path = root / f"{split}-{key}.npy", root / f"{split}-{key}.json"
    shape = (len(chars) * per_class, 1, cfg.size, cfg.size)
    images = _read_images(images_path, manifest_path, key, shape)
    if images is not None:
        return images, key
    tasks = [(part, cfg.size, aug, cfg.seed) for part in _chunks(plans, 64)]
    sizes = [len(part) * per_class for part in _chunks(plans, 64)]
    stacks = _run(_render_chars, tasks, sizes, workers or _default_workers(), f"glyphs: render {split}",
                  progress)
    rendered = np.concatenate(stacks)[:, None] if stacks else np.zeros(shape, np.uint8)
    with atomic_path(images_path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, rendered)
    write_json(manifest_path, {
        "key": key, "split": split, "shape": list(shape), "images_per_class": per_class,
        "size": cfg.size, "seed": cfg.seed, "augmentation": aug, "fonts": table.fonts, "scan": table.key,
        "rasterizer": _rasterizer(), "version": RENDER_VERSION,
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
