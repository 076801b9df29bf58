"""UniBCT (methods.md item 5): the ``unibct`` compatibility term and the pseudo prototypes it trains
against, kept together.

- :mod:`~bctkit.losses.unibct.term`: the term (registered as ``unibct`` on import).
- :mod:`~bctkit.losses.unibct.prototypes`: class means and drop means of the old features.
- :mod:`~bctkit.losses.unibct.refinement`: the structural refinement (Eqs. 6-10) and its weights.
- :mod:`~bctkit.losses.unibct.inputs`: the checks the builders share.
"""

from bctkit.losses.unibct.prototypes import class_means, drop_means
from bctkit.losses.unibct.refinement import (
    refine_prototypes,
    refinement_weights,
    weight_summary,
    weighted_means,
)
from bctkit.losses.unibct.term import UniBCT, UniBCTParams

__all__ = [
    "UniBCT",
    "UniBCTParams",
    "class_means",
    "drop_means",
    "refine_prototypes",
    "refinement_weights",
    "weight_summary",
    "weighted_means",
]
