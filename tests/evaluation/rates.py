"""The reference reading of a rate for exact floors, shared by the metric tests."""

import functools
import itertools
from fractions import Fraction


@functools.cache
def meant(rate: float) -> Fraction:
    """The simplest fraction that rounds to the float ``rate`` (0.57 -> 57/100), by search over
    denominators (independent of the library's continued-fraction computation)."""
    for q in itertools.count(1):
        p = round(rate * q)
        if float(Fraction(p, q)) == rate:
            return Fraction(p, q)
    raise AssertionError("unreachable")
