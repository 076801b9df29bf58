"""Losses: classification heads live in bctkit.models.heads; compatibility terms live here.

Importing this package registers every built-in method.
"""

from bctkit.losses import bct, bt2, contrastive, independent, l2, lwf, mixbct, unibct  # noqa: F401  (registration)
from bctkit.losses.base import (
    CompatBatch,
    CompatContext,
    CompatibilityTerm,
    TermOutput,
    TermParams,
    available_methods,
    build_term,
    register,
    validate_params,
)

__all__ = [
    "CompatBatch",
    "CompatContext",
    "CompatibilityTerm",
    "TermOutput",
    "TermParams",
    "available_methods",
    "build_term",
    "register",
    "validate_params",
]
