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

Modules, one concept each: :mod:`~bctkit.data.glyphs.config` (options, cache root and keys),
:mod:`~bctkit.data.glyphs.fonts` (font files and faces), :mod:`~bctkit.data.glyphs.render` (drawing
one image), :mod:`~bctkit.data.glyphs.scan` (the font scan), :mod:`~bctkit.data.glyphs.jobs` (running
work in forked processes) and :mod:`~bctkit.data.glyphs.source` (the dataset and its image cache).
"""

from bctkit.data.glyphs.config import GlyphsConfig, cache_root
from bctkit.data.glyphs.fonts import (
    DEFAULT_FONT_DIRS,
    FONT_PACKAGES,
    FONT_SUFFIXES,
    MIN_RASTER_PX,
    Face,
    find_font_files,
    fonts_fingerprint,
    missing_fonts_error,
    read_faces,
)
from bctkit.data.glyphs.jobs import SERIAL_BELOW
from bctkit.data.glyphs.render import RENDER_VERSION, glyph_ink, render_clean, render_image
from bctkit.data.glyphs.scan import (
    MISSING_CODEPOINT,
    SCAN_MARGIN,
    SCAN_SIZE,
    SCAN_VERSION,
    GlyphTable,
    scan_fonts,
)
from bctkit.data.glyphs.source import image_plan, load_glyphs, select_identities

__all__ = [
    "DEFAULT_FONT_DIRS",
    "FONT_PACKAGES",
    "FONT_SUFFIXES",
    "MIN_RASTER_PX",
    "MISSING_CODEPOINT",
    "RENDER_VERSION",
    "SCAN_MARGIN",
    "SCAN_SIZE",
    "SCAN_VERSION",
    "SERIAL_BELOW",
    "Face",
    "GlyphTable",
    "GlyphsConfig",
    "cache_root",
    "find_font_files",
    "fonts_fingerprint",
    "glyph_ink",
    "image_plan",
    "load_glyphs",
    "missing_fonts_error",
    "read_faces",
    "render_clean",
    "render_image",
    "scan_fonts",
    "select_identities",
]
