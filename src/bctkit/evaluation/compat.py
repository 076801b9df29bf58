"""Compatibility report arithmetic (evaluation.md, "Compatibility report").

M[i][j] is a metric (higher is better) with queries embedded by model i and the gallery by model j.
Models are ordered oldest first when the matrix describes a chain of updates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from bctkit.errors import DataError
from bctkit.evaluation.search import ArrayLike, encode_ids, normalized

BACKFILL_METRICS = ("top1", "map")
DEFAULT_FRACTIONS = tuple(round(0.1 * i, 10) for i in range(11))


def compatibility_matrix(
    values: Mapping[tuple[str, str], float], names: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """N x N matrix from {(query_model, gallery_model): value}; missing pairs are NaN.

    ``names`` fixes the row/column order (default: order of first appearance in ``values``).
    """
    if names is None:
        order: dict[str, None] = {}
        for q, g in values:
            order.setdefault(q)
            order.setdefault(g)
        names = list(order)
    names = list(names)
    pos = {n: i for i, n in enumerate(names)}
    if len(pos) != len(names):
        raise DataError(f"model names must be unique, got {names}")
    m = np.full((len(names), len(names)), np.nan)
    for (q, g), v in values.items():
        if q not in pos or g not in pos:
            raise DataError(f"pair ({q!r}, {g!r}) names a model missing from names={names}")
        m[pos[q], pos[g]] = float(v)
    return m, names


def compute_matrix(
    metric_fn: Callable[[ArrayLike, ArrayLike], float],
    feats_by_model: Mapping[str, tuple[ArrayLike, ArrayLike]],
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """M[i][j] = metric_fn(query_feats of model i, gallery_feats of model j) for every pair.

    ``metric_fn`` closes over labels; dimension handling for d_n != d_o belongs to the caller.
    """
    names = list(feats_by_model) if names is None else list(names)
    values = {
        (qn, gn): metric_fn(feats_by_model[qn][0], feats_by_model[gn][1]) for qn in names for gn in names
    }
    return compatibility_matrix(values, names)


def criterion(m: np.ndarray, new: int, old: int) -> bool:
    """Empirical compatibility criterion: M[new][old] > M[old][old] (strict; NaN fails)."""
    m = np.asarray(m, dtype=np.float64)
    return bool(m[new, old] > m[old, old])


def update_gain(cross: float, old_self: float, paragon_self: float) -> float | None:
    """BCT Eq. 9: (M[n][o] - M[o][o]) / (M[p][p] - M[o][o]).

    None when the criterion fails (cross <= old_self) or the paragon does not beat the old model
    (the gain is then undefined).
    """
    if not (cross > old_self) or not (paragon_self > old_self):
        return None
    return float((cross - old_self) / (paragon_self - old_self))


def chain_metrics(m: np.ndarray, am_include_diagonal: bool = False) -> dict[str, float]:
    """Multi-model metrics of an N x N matrix of a chain (row/col 0 = oldest model).

    - AC (CoReS/CL2R average compatibility): fraction of pairs i > j with M[i][j] > M[j][j],
      STRICT inequality (a tie counts as not compatible).
    - AM: mean of M[i][j] over i > j (the strict lower triangle); with ``am_include_diagonal``
      over i >= j, which is the CoReS/CL2R paper formula.
    - BC (CL2R backward compatibility): (1 / (N-1)) sum_{j < N-1} (M[N-1][j] - M[j][j]): how the
      newest model's queries fare on each older gallery, relative to that gallery's own model.
    - FC (CL2R forward compatibility): (1 / (N-1)) sum_{t >= 1} (M[t][t-1] - M[t][t]): each
      update's cross test against the previous gallery, relative to its own self test.
    With one model AC, BC and FC are NaN.
    """
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise DataError(f"compatibility matrix must be square and non-empty, got shape {m.shape}")
    n = m.shape[0]
    diag = np.diag(m)
    ii, jj = np.tril_indices(n, k=-1)
    am_i, am_j = np.tril_indices(n, k=0 if am_include_diagonal else -1)
    out = {
        "AC": float(np.mean(m[ii, jj] > diag[jj])) if n > 1 else math.nan,
        "AM": float(np.mean(m[am_i, am_j])) if am_i.size else math.nan,
        "BC": float(np.mean(m[n - 1, : n - 1] - diag[: n - 1])) if n > 1 else math.nan,
        "FC": float(np.mean(m[np.arange(1, n), np.arange(n - 1)] - diag[1:])) if n > 1 else math.nan,
    }
    return out


BACKFILL_ORDER_NAMES = ("random", "distance", "benefit")
"""The partial-backfill orders a run's report measures (``benefit`` is ``bctkit gallery backfill``'s)."""
TRANSFORM_ORDER_NAMES = ("random", "benefit", "uncertainty")
"""The orders of a transformed gallery's backfill (``uncertainty``: FastFill's, largest first)."""
ORDERS = ("random", "distance", "benefit", "uncertainty")


def _backfill_order(
    gallery_old: torch.Tensor,
    gallery_new: torch.Tensor,
    units: torch.Tensor,
    n_units: int,
    order: str,
    seed: int,
    old_norms: torch.Tensor,
    uncertainty: torch.Tensor | None = None,
) -> np.ndarray:
    """Order in which units (classes or items) are backfilled; see partial_backfill_curve."""
    if order == "random":
        return np.random.default_rng(seed).permutation(n_units)
    if order not in ORDERS:
        raise DataError(f"unknown backfill order {order!r}; expected one of {ORDERS}")
    if order == "uncertainty":
        if uncertainty is None:
            raise DataError("backfill order 'uncertainty' needs each gallery item's uncertainty")
        value, sign = uncertainty.to(torch.float64), -1.0  # most uncertain first
    elif order == "benefit":
        value, sign = old_norms.to(torch.float64), 1.0  # smallest old-embedding norm first
    else:
        d = min(gallery_old.shape[1], gallery_new.shape[1])
        old = torch.nn.functional.normalize(gallery_old[:, :d], dim=1)
        new = torch.nn.functional.normalize(gallery_new[:, :d], dim=1)
        value, sign = (1.0 - (old * new).sum(1)).to(torch.float64), -1.0  # largest change first
    per_unit = torch.zeros(n_units, dtype=torch.float64).index_add_(0, units, value)
    per_unit /= torch.bincount(units, minlength=n_units).to(torch.float64)
    return np.argsort(sign * per_unit.numpy(), kind="stable")


def _ranked_ap(rel: torch.Tensor) -> torch.Tensor:
    """AP of each row of a relevance matrix in ranked order, nothing junk: the mean precision at the
    hits. The backfill curve ranks mixed old/new score rows, which are no single feature pair."""
    rank = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
    cum_rel = torch.cumsum(rel, dim=1, dtype=torch.float64)
    return torch.where(rel, cum_rel / rank, 0.0).sum(1) / cum_rel[:, -1]


def partial_backfill_curve(
    query_new: ArrayLike,
    gallery_old: ArrayLike,
    gallery_new: ArrayLike,
    gallery_ids: ArrayLike,
    query_ids: ArrayLike,
    metric: str = "top1",
    fractions: Sequence[float] | np.ndarray = DEFAULT_FRACTIONS,
    by: str = "class",
    order: str = "random",
    seed: int = 0,
    query_cross: ArrayLike | None = None,
    block_queries: int = 256,
    uncertainty: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Metric of new-model queries on a gallery partly re-embedded by the new model.

    For each fraction p, round(p * U) units (U = number of gallery classes when ``by="class"``, of
    gallery items when ``by="item"``) take their new features; the rest keep the old ones.
    Ordering: "random" = a seeded permutation; "distance" = largest old/new change first, the
    change of an item being 1 - cos(old, new) over the first min(d_o, d_n) coordinates and that of
    a class the mean over its items; "benefit" = smallest L2 norm of the (un-normalised) old
    embedding first, a class's being the mean over its items (``bctkit gallery backfill --order
    benefit``), ties in unit order; "uncertainty" = largest ``uncertainty`` (one value per gallery
    item, FastFill's predicted log sigma^2 of a transformed gallery) first, a class's being the mean
    over its items. For a transformed gallery h(old) (passed as ``gallery_old``), "benefit" reads
    the norms of h(old), the vectors the store holds. Queries are compared with old items through
    ``query_cross``
    (default: ``query_new``; pass the compatible sub-embedding when d_n != d_o) and with new items
    through ``query_new``. metric "top1": closed-set rank-1 accuracy over probes whose identity is
    in the gallery; "map": mAP over queries with a relevant item. Cosine similarity throughout.
    Returns (fractions, values, area) with area = trapezoid rule of values over p.
    """
    if metric not in BACKFILL_METRICS:
        raise DataError(f"unknown backfill metric {metric!r}; expected one of {BACKFILL_METRICS}")
    if by not in ("class", "item"):
        raise DataError(f"unknown backfill unit {by!r}; expected 'class' or 'item'")
    q_new = normalized(query_new, "query_new")
    q_x = q_new if query_cross is None else normalized(query_cross, "query_cross")
    g_old = normalized(gallery_old, "gallery_old")
    g_new = normalized(gallery_new, "gallery_new")
    if g_old.shape[0] == 0:
        raise DataError("gallery_old is empty; expected at least one gallery item")
    if g_old.shape[0] != g_new.shape[0]:
        raise DataError(
            f"gallery_old has {g_old.shape[0]} rows but gallery_new has {g_new.shape[0]}; "
            "expected the same items"
        )
    if q_x.shape[0] != q_new.shape[0]:
        raise DataError("query_cross and query_new must have the same number of rows")
    if q_x.shape[1] != g_old.shape[1]:
        raise DataError(
            f"query_cross dim {q_x.shape[1]} != gallery_old dim {g_old.shape[1]}; pass "
            "query_cross with the compatible coordinates"
        )
    if q_new.shape[1] != g_new.shape[1]:
        raise DataError(f"query_new dim {q_new.shape[1]} != gallery_new dim {g_new.shape[1]}")
    qid, gid = encode_ids(query_ids, gallery_ids)
    if qid.shape[0] != q_new.shape[0] or gid.shape[0] != g_old.shape[0]:
        raise DataError("query_ids / gallery_ids must have one label per feature row")
    fr = np.asarray(fractions, dtype=np.float64).ravel()
    if fr.size == 0 or fr.min() < 0 or fr.max() > 1:
        raise DataError("fractions must be a non-empty list of values in [0, 1]")
    if by == "class":
        _, inv = np.unique(gid.numpy(), return_inverse=True)
        units = torch.as_tensor(inv.ravel().astype(np.int64))
    else:
        units = torch.arange(g_old.shape[0])
    n_units = int(units.max()) + 1
    norms = torch.as_tensor(np.asarray(gallery_old), dtype=torch.float64).norm(dim=1)  # raw
    unc = (None if uncertainty is None
           else torch.as_tensor(np.asarray(uncertainty), dtype=torch.float64).ravel())
    if unc is not None and unc.shape[0] != g_old.shape[0]:
        raise DataError(f"uncertainty has {unc.shape[0]} values for {g_old.shape[0]} gallery items")
    rank_of_unit = np.empty(n_units, dtype=np.int64)
    rank_of_unit[_backfill_order(g_old, g_new, units, n_units, order, seed, norms, unc)] = np.arange(n_units)
    item_rank = torch.as_tensor(rank_of_unit)[units]
    counts = [int(round(p * n_units)) for p in fr]

    keep = torch.isin(qid, gid)
    if not bool(keep.any()):
        raise DataError("no query identity is present in the gallery; the curve is undefined")
    sums = np.zeros(fr.size)
    n_eval = 0
    for qs in range(0, q_new.shape[0], block_queries):
        sl = slice(qs, qs + block_queries)
        kb = keep[sl]
        if not bool(kb.any()):
            continue
        s_old = q_x[sl][kb] @ g_old.T
        s_new = q_new[sl][kb] @ g_new.T
        ids = qid[sl][kb]
        n_eval += int(kb.sum())
        for f, c in enumerate(counts):
            mix = torch.where((item_rank < c)[None, :], s_new, s_old)
            if metric == "top1":
                sums[f] += float((gid[mix.argmax(1)] == ids).sum())
            else:
                ranked = torch.sort(mix, dim=1, descending=True, stable=True).indices
                rel = gid[ranked] == ids[:, None]
                sums[f] += float(_ranked_ap(rel).sum())
    values = sums / n_eval
    area = float(np.trapezoid(values, fr)) if fr.size > 1 else math.nan
    return fr, values, area
