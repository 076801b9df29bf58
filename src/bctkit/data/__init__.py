"""Data: datasets (embedded synthetic images, rendered CJK glyphs) and the five old/new allocations."""

from bctkit.data.allocation import SCENARIOS, Allocation, allocate
from bctkit.data.glyphs import GlyphsConfig, load_glyphs
from bctkit.data.imageset import ImageSet
from bctkit.data.synthetic import SyntheticSpec, make_synthetic

__all__ = [
    "SCENARIOS", "Allocation", "GlyphsConfig", "ImageSet", "SyntheticSpec", "allocate", "load_glyphs",
    "make_synthetic",
]
