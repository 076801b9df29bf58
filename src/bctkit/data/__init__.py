"""Data: datasets (embedded synthetic images) and the five old/new allocations."""

from bctkit.data.allocation import SCENARIOS, Allocation, allocate
from bctkit.data.imageset import ImageSet
from bctkit.data.synthetic import SyntheticSpec, make_synthetic

__all__ = ["SCENARIOS", "Allocation", "ImageSet", "SyntheticSpec", "allocate", "make_synthetic"]
