"""The options of the ``glyphs`` dataset, and where its caches live and how their keys are made."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bctkit.storage import cache_home


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


def cache_root(cfg: GlyphsConfig) -> Path:
    """Where the glyph caches live: ``cfg.cache_dir``, else $BCTKIT_CACHE, else ~/.cache/bctkit."""
    return (Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_home()) / "glyphs"


def digest(obj: Any) -> str:
    """Short hash of a JSON-serialisable object: the key of a glyph cache entry."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]
