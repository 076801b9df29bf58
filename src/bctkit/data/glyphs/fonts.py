"""Font files and their faces: the Debian packages that give the benchmark, the folders searched, which
faces a file holds and which candidate characters their cmaps map, and the error naming the packages
to install when too few characters are drawn."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ImageFont

from bctkit.data.glyphs.config import GlyphsConfig, digest
from bctkit.errors import DataError

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
MIN_RASTER_PX = 96
"""Smallest pixel size glyphs are drawn at; a face that cannot be opened at it is not used."""


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


def fonts_fingerprint(files: Iterable[Path]) -> str:
    """Hash of the font files' paths, sizes and modification times (a changed font rescans)."""
    stats = []
    for path in files:
        st = path.stat()
        stats.append([str(path), st.st_size, st.st_mtime_ns])
    return digest(stats)


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


def missing_fonts_error(found: int, needed: int, cfg: GlyphsConfig, faces: int) -> DataError:
    """The one-line error for too few usable characters, naming the Debian packages to install."""
    dirs = cfg.font_dirs if cfg.font_dirs is not None else list(DEFAULT_FONT_DIRS)
    return DataError(
        f"glyphs: found {found} characters drawn by >= {cfg.min_faces} distinct font faces "
        f"({faces} CJK faces in {', '.join(dirs)}), need {needed}; install the Debian packages: "
        f"apt-get install {' '.join(FONT_PACKAGES)} (scripts/setup.sh does this)"
    )
