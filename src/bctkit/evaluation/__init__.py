"""Evaluation: metrics (verification, identification, retrieval), protocols and reports."""

from bctkit.evaluation.identification import cmc
from bctkit.evaluation.verification import tar_at_far

__all__ = ["cmc", "tar_at_far"]
