"""Evaluation protocols: one module per test set layout, one interface (:class:`Protocol`).

``split`` is the run's own split of a labelled image set (:class:`EvalProtocol`); ``ijb`` IJB-B / IJB-C
(:class:`IJBProtocol`); ``pairs`` insightface's verification pair sets (:class:`PairsProtocol`);
``retrieval`` separate query and gallery sets (:class:`QueryGalleryProtocol`); ``reid`` Market-1501 /
DukeMTMC-reID (:class:`ReIDProtocol`); ``loo`` leave-one-out over one labelled set
(:class:`LeaveOneOutProtocol`); ``revisited`` revisited Oxford / Paris (+ R1M) (:class:`RevisitedProtocol`);
``gldv2`` GLDv2's retrieval test (:class:`GLDv2Protocol`). The test-set protocols are imported from their
modules.
"""

from bctkit.evaluation.protocols.base import (
    PairResult,
    Protocol,
    check_comparable,
    comparable,
    evaluate_models,
    rate_name,
)
from bctkit.evaluation.protocols.split import CMC_CURVE_RANKS, EvalProtocol, evaluate_pair

__all__ = ["CMC_CURVE_RANKS", "EvalProtocol", "PairResult", "Protocol", "check_comparable", "comparable",
           "evaluate_models", "evaluate_pair", "rate_name"]
