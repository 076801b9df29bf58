"""Evaluation: metrics (verification, identification, retrieval), search, compatibility analysis,
the run protocol, plots and reports. Definitions: docs/evaluation.md."""

from bctkit.evaluation.compat import (
    chain_metrics,
    compatibility_matrix,
    compute_matrix,
    criterion,
    partial_backfill_curve,
    update_gain,
)
from bctkit.evaluation.identification import cmc, tpir_at_fpir
from bctkit.evaluation.retrieval import (
    map_at_r,
    mean_average_precision,
    r_precision,
    recall_at_k,
    retrieval_metrics,
)
from bctkit.evaluation.search import FaissIndex, faiss_search, topk_search
from bctkit.evaluation.templates import pair_scores, template_features
from bctkit.evaluation.verification import roc_auc, roc_curve, tar_at_far

__all__ = [
    "FaissIndex",
    "chain_metrics",
    "cmc",
    "compatibility_matrix",
    "compute_matrix",
    "criterion",
    "faiss_search",
    "map_at_r",
    "mean_average_precision",
    "pair_scores",
    "partial_backfill_curve",
    "r_precision",
    "recall_at_k",
    "retrieval_metrics",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "template_features",
    "topk_search",
    "tpir_at_fpir",
    "update_gain",
]
