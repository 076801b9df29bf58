"""Data: dataset sources (files on disk, the embedded synthetic and glyphs sets), preprocessing, and
the five old/new allocations."""

from bctkit.data.allocation import SCENARIOS, Allocation, allocate
from bctkit.data.glyphs import GlyphsConfig, load_glyphs
from bctkit.data.sources import (
    ArraySource,
    DataSource,
    ImageFolderSource,
    ListSource,
    RecordIOSource,
    SubsetSource,
)
from bctkit.data.synthetic import SyntheticSpec, make_synthetic
from bctkit.data.transforms import Preprocess, TransformConfig

__all__ = [
    "SCENARIOS", "Allocation", "ArraySource", "DataSource", "GlyphsConfig", "ImageFolderSource", "ListSource",
    "Preprocess", "RecordIOSource", "SubsetSource", "SyntheticSpec", "TransformConfig", "allocate",
    "load_glyphs", "make_synthetic",
]
