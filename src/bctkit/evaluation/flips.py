"""Negative and positive flips: the queries an update breaks and the ones it fixes.

Regression-free updates (Yan et al., "Positive-Congruent Training", CVPR 2021; Zhang et al.,
"Hot-Refresh Model Upgrades with Regression-Free Compatible Training in Image Retrieval", ICLR
2022) count, over the same queries, those the old system answered right at rank 1 and the updated
one answers wrong (negative flips), and the mirror (positive flips). An average can rise while
users see their own queries break; the negative flip rate says how many do.

For each (query model, gallery model) pair of a report other than old / old, on every protocol that
measures top-1 (:attr:`~bctkit.evaluation.protocols.base.PairResult.top1_hits`):
NFR = #(right under old / old and wrong under the pair) / #queries, PFR = #(wrong under old / old
and right under the pair) / #queries. Where top-1 is the mean over these queries (all but IJB 1:N,
whose top-1 averages G1's and G2's), top-1 (pair) - top-1 (old / old) = PFR - NFR. No flips where
top-1 is undefined (no query counts: NaN) or not measured (pair sets, an approximate index).
"""

from __future__ import annotations

from typing import Any

import torch

from bctkit.errors import DataError
from bctkit.evaluation.protocols.base import PairResult

__all__ = ["flip_rates", "flip_table", "flips_of"]


def flip_rates(reference: torch.Tensor, hits: torch.Tensor) -> tuple[float, float]:
    """(negative, positive) flip rates of ``hits`` against ``reference`` (bool, one per query,
    the same queries in the same order)."""
    ref, new = torch.as_tensor(reference, dtype=torch.bool), torch.as_tensor(hits, dtype=torch.bool)
    if ref.shape != new.shape or ref.ndim != 1 or not ref.numel():
        raise DataError(f"flip rates: top-1 hits of {list(ref.shape)} and {list(new.shape)} queries; "
                        "expected the same non-empty list of queries")
    n = ref.numel()
    return float((ref & ~new).sum()) / n, float((~ref & new).sum()) / n


def flip_table(pairs: dict[tuple[str, str], PairResult], old: str = "old") -> list[dict[str, Any]]:
    """One entry per pair with top-1 hits other than (old, old): {query_model, gallery_model,
    negative_flip_rate, positive_flip_rate, negative_flips, positive_flips, n, protocol (the pair's
    top-1 definition)}; empty when the protocol measures no top-1 or no query counts for it."""
    base = pairs.get((old, old))
    if base is None or base.top1_hits is None or not base.top1_hits.numel():
        return []
    ref = base.top1_hits.bool()
    out = []
    for (q, g), res in pairs.items():
        if (q, g) == (old, old) or res.top1_hits is None:
            continue
        nfr, pfr = flip_rates(ref, res.top1_hits)
        hits = res.top1_hits.bool()
        out.append({"query_model": q, "gallery_model": g, "negative_flip_rate": nfr,
                    "positive_flip_rate": pfr, "negative_flips": int((ref & ~hits).sum()),
                    "positive_flips": int((~ref & hits).sum()), "n": int(ref.numel()),
                    "protocol": next((r["protocol"] for r in res.records if r["metric"] == "top1"), "")})
    return out


def flips_of(report: dict[str, Any], query: str, gallery: str) -> dict[str, Any] | None:
    """The flip entry of one pair in ``report["flips"]`` (None when it has none)."""
    entries = report.get("flips") or []
    return next((f for f in entries if (f["query_model"], f["gallery_model"]) == (query, gallery)), None)
