"""Drawing one glyph image: a character in a face, clean (the scan's comparison image) or under a
seeded random distortion (a dataset image)."""

from __future__ import annotations

import math

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter, ImageFont, features

from bctkit.data.glyphs.fonts import MIN_RASTER_PX, Face
from bctkit.errors import DataError

RENDER_VERSION = 1
"""Bump this when a code change alters an image's pixels (it keys the image cache)."""


OPEN_FONTS: dict[tuple[str, int, int], ImageFont.FreeTypeFont] = {}
"""Faces opened by this process, by (path, index, pixel size); worker processes start it empty."""


def _font(face: Face, px: int) -> ImageFont.FreeTypeFont:
    """The face at pixel size ``px``, opened once per process."""
    key = (face.path, face.index, px)
    if key not in OPEN_FONTS:
        OPEN_FONTS[key] = ImageFont.truetype(face.path, px, index=face.index)
    return OPEN_FONTS[key]


def _raster_px(size: int) -> int:
    return max(MIN_RASTER_PX, 3 * size)


def rasterizer() -> str:
    """Pillow and FreeType versions: another rasteriser may draw other pixels."""
    return f"pillow {PIL.__version__} freetype {features.version('freetype2')}"


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
