"""1:1 verification over all pairs i < j of N images, exact, in memory bounded by a block of scores.

The run protocol scores every pair (i, j), i < j: image i by the query model, image j by the gallery
model. Building the N x N score matrix needs 4 N^2 bytes (40 GB at N = 100,000); this module computes
it a row block at a time (max(256, 2^20 / N) rows: 8 MiB of float32 scores at N = 8,000, 100 MiB at
N = 100,000), consumes each block in chunks of 2^20 scores (4 MiB; their work arrays are a few times
that) and keeps only what the metrics need:

- every genuine score (same label): there are sum over identities of n_c (n_c - 1) / 2 of them;
- the K largest impostor scores, K = floor(max_f N_imp) + 1 over the FARs with f N_imp >= 1: the exact
  threshold at FAR f is the (floor(f N_imp) + 1)-th largest impostor score, so these K give exactly
  the thresholds, NaN rule and tie handling of :func:`verification.tar_at_far`. A running top K is
  merged chunk by chunk; only scores above its current minimum are buffered (2K + one chunk). K
  above :data:`MAX_KEPT` (256 MiB of scores; f = 1e-1 at N = 100,000 needs 5e8) is a DataError
  naming the FAR: it is never approximated.
- a histogram of the impostor scores over buckets of their float32 bit patterns, with bucket edges
  spaced over the genuine scores' range. ROC AUC is the Mann-Whitney statistic (ties count one half),
  accumulated in integers: an impostor in a bucket holding no genuine score is below exactly the
  genuine scores above the bucket; impostors in the other buckets are located among the sorted
  genuine scores one by one. The same histogram gives the exact (FPR, TPR) at every bucket edge.

Two passes over the blocks (genuine scores first, then impostors against them): the matrix product
is computed twice, the price of not storing it. Each row block is ``query_rows @ gallery.T`` on the
whole normalised gallery, the same product as the full matrix; with torch's CPU BLAS (MKL, checked
with torch 2.13 on x86-64) row blocks of 256 rows or more reproduce the full product's bits. Smaller
blocks may differ in the last bit, which moves a metric only where a genuine and an impostor score
are 1 ulp apart at a threshold; so no block is smaller (the last one absorbs the remainder).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from bctkit.errors import DataError
from bctkit.evaluation.verification import check_rate, floor_rate_count, thresholds_from_top

TILE = 1 << 20  # scores per chunk (4 MiB of float32)
MIN_ROWS = 256  # rows per matrix product at least (see the module docstring)
MAX_KEPT = 1 << 26  # largest impostor scores kept for the thresholds (256 MiB of float32)
MAX_BUCKETS = 1 << 20  # impostor histogram buckets over the genuine scores' range
CURVE_FARS = 300  # ROC points log-spaced in FPR ...
CURVE_TARS = 101  # ... and evenly spaced in TPR


@dataclass
class AllPairsVerification:
    """Exact verification results over all pairs i < j."""

    n_pairs: int
    n_genuine: int
    n_impostor: int
    tar: dict[float, float]  # exact TAR per FAR (NaN where f N_imp < 1), keyed by the FAR as given
    auc: float  # ROC AUC, ties counting one half
    fpr: np.ndarray  # ROC points (acceptance: score >= threshold), increasing; see roc_points
    tpr: np.ndarray


def _keys(scores: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys with the same order (-0.0 equal to +0.0)."""
    bits = (scores + 0.0).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64) + (1 << 31)


def tile_rows(n: int, block_rows: int | None = None) -> int:
    """Rows per product: ``block_rows`` if given, else TILE scores but at least MIN_ROWS rows."""
    if block_rows is not None:
        if block_rows < 1:
            raise DataError(f"block_rows must be >= 1, got {block_rows}")
        return block_rows
    return max(1, min(n, max(MIN_ROWS, TILE // max(1, n))))


def _tiles(qn: torch.Tensor, gn: torch.Tensor, labels: torch.Tensor, rows: int
           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(genuine scores, impostor scores) of the pairs i < j, float32, a row block at a time and, inside
    it, TILE elements at a time (the work arrays of each chunk are a few times its size)."""
    n = qn.shape[0]
    starts = list(range(0, n, rows))
    if len(starts) > 1 and n - starts[-1] < rows:
        starts.pop()  # the last block takes the remainder: no block below ``rows`` rows
    for r0, r1 in zip(starts, starts[1:] + [n], strict=True):
        if r0 + 1 >= n:
            break
        block = qn[r0:r1] @ gn.T  # the full product's row block: same bits (module docstring)
        step = max(1, TILE // (r1 - r0))
        for c0 in range(r0 + 1, n, step):
            c1 = min(n, c0 + step)
            sc = block[:, c0:c1]
            upper = torch.arange(c0, c1)[None, :] > torch.arange(r0, r1)[:, None]
            same = labels[r0:r1, None] == labels[None, c0:c1]
            yield sc[upper & same], sc[upper & ~same]


def _top_k(tiles: Iterator[tuple[torch.Tensor, torch.Tensor]], k: int, n_gen: int, n_imp: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(all genuine scores, the k largest impostor scores in descending order) from one pass.

    Both go to buffers allocated once (many small long-lived tensors would fragment the heap): the
    genuine scores, and 2k + TILE impostor candidates (8 k bytes plus 4 MiB). When the candidates
    reach 2k, an in-place partition keeps the k largest, whose minimum becomes the cutoff.
    """
    genuine = np.empty(n_gen, dtype=np.float32)
    n_seen = 0
    buf = np.empty(min(2 * k + TILE, n_imp) if k else 0, dtype=np.float32)
    fill = 0
    cutoff = -math.inf
    for gen, imp in tiles:
        genuine[n_seen : n_seen + gen.numel()] = gen.numpy()
        n_seen += gen.numel()
        if k == 0:
            continue
        # a score equal to the current k-th largest cannot change the k largest values
        cand = (imp[imp > cutoff] if cutoff > -math.inf else imp).numpy()
        buf[fill : fill + cand.size] = cand
        fill += cand.size
        if fill >= 2 * k:
            buf[:fill].partition(fill - k)
            buf[:k] = buf[fill - k : fill]
            fill, cutoff = k, float(buf[0])
    top = buf[:fill]
    top.sort()
    return torch.from_numpy(genuine[:n_seen]), torch.from_numpy(top[::-1][:k].copy())


def _histogram_pass(tiles: Iterator[tuple[torch.Tensor, torch.Tensor]], gen_sorted: torch.Tensor
                    ) -> tuple[int, torch.Tensor, torch.Tensor, int]:
    """Impostors against the sorted genuine scores: (2 x Mann-Whitney U, #genuine below each bucket
    edge, #impostors at or above each edge, #impostors above the highest genuine score)."""
    n_gen = gen_sorted.numel()
    gk = _keys(gen_sorted)
    kmin, kmax = int(gk[0]), int(gk[-1])
    shift = 0
    while ((kmax - kmin) >> shift) + 1 > MAX_BUCKETS:
        shift += 1
    n_b = ((kmax - kmin) >> shift) + 1
    edges = kmin + (torch.arange(n_b + 1, dtype=torch.int64) << shift)
    first = torch.searchsorted(gk, edges, side="left")  # genuine scores below each edge
    mixed = first[1:] > first[:-1]  # buckets holding a genuine score
    hist = torch.zeros(n_b, dtype=torch.int64)
    u2 = 0  # sum over impostors of (#genuine > x) * 2 + (#genuine == x)
    n_above = 0
    for _, imp in tiles:
        x = _keys(imp)
        below, above = x < kmin, x > kmax
        n_above += int(above.sum())
        u2 += 2 * n_gen * int(below.sum())
        inside = ~(below | above)
        b = (x[inside] - kmin) >> shift
        hist += torch.bincount(b, minlength=n_b)
        exact = imp[inside][mixed[b]]
        left = torch.searchsorted(gen_sorted, exact, side="left")
        right = torch.searchsorted(gen_sorted, exact, side="right")
        u2 += int((2 * n_gen - left - right).sum())
    plain = ~mixed
    u2 += int((hist[plain] * (2 * n_gen - 2 * first[:-1][plain])).sum())
    at_or_above = n_above + torch.flip(torch.cumsum(torch.flip(hist, (0,)), 0), (0,))
    return u2, first[:-1], at_or_above, n_above


def roc_points(fpr: np.ndarray, tpr: np.ndarray, n_imp: int) -> tuple[np.ndarray, np.ndarray]:
    """Thin exact ROC points (sorted by threshold, decreasing) to those nearest below CURVE_FARS FPRs
    log-spaced from 1 / N_imp to 1 and CURVE_TARS TPRs evenly spaced, plus (0, 0) and (1, 1)."""
    order = np.lexsort((tpr, fpr))
    fpr, tpr = fpr[order], tpr[order]
    far_t = np.logspace(math.log10(1.0 / n_imp), 0.0, CURVE_FARS)
    tar_t = np.linspace(0.0, 1.0, CURVE_TARS)
    idx = np.concatenate([np.searchsorted(fpr, far_t, side="right") - 1,
                          np.searchsorted(tpr, tar_t, side="right") - 1, [0, fpr.size - 1]])
    idx = np.unique(idx[idx >= 0])
    return fpr[idx], tpr[idx]


def allpairs_verification(
    query: torch.Tensor,
    gallery: torch.Tensor,
    labels: torch.Tensor,
    fars: Sequence[float],
    block_rows: int | None = None,
) -> AllPairsVerification:
    """Exact TAR@FAR, ROC AUC and ROC points over all pairs i < j (query row i vs gallery row j).

    Scores are cosine similarities of the rows normalised as a whole, in float32 (as the full matrix
    ``normalize(query) @ normalize(gallery).T``). ``block_rows`` overrides the row block height (tests).
    The values equal those of :func:`verification.tar_at_far` and :func:`verification.roc_auc` on the
    upper triangle of the full matrix (AUC up to the float rounding of the trapezoid sum: here it is
    the exact ratio of integer counts, correctly rounded). The ROC points are exact (FPR, TPR) at a
    few hundred thresholds (see :func:`roc_points`), not every vertex of the curve.
    """
    q, g = torch.as_tensor(query), torch.as_tensor(gallery)
    lab = torch.as_tensor(labels).flatten()
    n = q.shape[0]
    if q.ndim != 2 or g.shape != q.shape or lab.shape[0] != n:
        raise DataError(f"query {tuple(q.shape)}, gallery {tuple(g.shape)} and labels {tuple(lab.shape)}: "
                        "expected two [N, d] feature matrices and N labels")
    if not (torch.isfinite(q).all() and torch.isfinite(g).all()):
        raise DataError("features contain NaN or Inf; expected finite embeddings")
    fars = list(fars)
    for far in fars:
        check_rate(far, "FAR")
    per_id = torch.unique(lab, return_counts=True)[1].to(torch.int64)
    n_pairs = n * (n - 1) // 2
    n_gen = int((per_id * (per_id - 1) // 2).sum())
    n_imp = n_pairs - n_gen
    if n_gen == 0:
        raise DataError("labels contain no genuine pair (two images of one identity); TAR is undefined")
    if n_imp == 0:
        raise DataError("labels contain no impostor pair (images of two identities); FAR is undefined")
    if 2 * n_gen * n_imp >= 1 << 63:
        raise DataError(f"{n} images: {n_gen} x {n_imp} genuine x impostor pairs overflow the 64-bit AUC "
                        "counts; evaluate fewer images")
    counts = {far: floor_rate_count(far, n_imp) for far in fars}
    k = max([c + 1 for c in counts.values() if 1 <= c < n_imp], default=0)
    if k > MAX_KEPT:
        far = max(f for f, c in counts.items() if c + 1 == k)
        raise DataError(f"FAR {far:g} over {n_imp} impostor pairs needs the {k} largest impostor scores "
                        f"kept; at most {MAX_KEPT} are: drop FAR {far:g} or evaluate fewer images")
    qn, gn = F.normalize(q.float(), dim=1), F.normalize(g.float(), dim=1)  # bctkit features are float32
    rows = tile_rows(n, block_rows)
    genuine, top = _top_k(_tiles(qn, gn, lab, rows), k, n_gen, n_imp)
    gen_sorted = torch.sort(genuine).values
    thresholds = thresholds_from_top(top, n_imp, counts)
    tar: dict[float, float] = {}
    for far, t in thresholds.items():
        if math.isnan(t):
            tar[far] = math.nan
            continue
        at = torch.tensor([t], dtype=gen_sorted.dtype)  # t is one of the float32 scores, or -inf
        tar[far] = (n_gen - int(torch.searchsorted(gen_sorted, at, side="right"))) / n_gen
    u2, gen_below, imp_at_or_above, n_top = _histogram_pass(_tiles(qn, gn, lab, rows), gen_sorted)
    auc = float(Fraction(u2, 2 * n_gen * n_imp))
    # exact ROC points: at the bucket edges, at the kept top impostor scores, and the two ends
    fpr = [imp_at_or_above.double() / n_imp, torch.tensor([n_top / n_imp, 0.0, 1.0], dtype=torch.float64)]
    tpr = [(n_gen - gen_below).double() / n_gen, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)]
    if top.numel():
        vals = top if k >= n_imp else top[top > top[-1]]
        last = torch.ones(vals.numel(), dtype=torch.bool)
        last[:-1] = vals[1:] != vals[:-1]
        pos = torch.nonzero(last).flatten()
        fpr.append((pos + 1).double() / n_imp)
        tpr.append((n_gen - torch.searchsorted(gen_sorted, vals[pos], side="left")).double() / n_gen)
    fp, tp = roc_points(torch.cat(fpr).numpy(), torch.cat(tpr).numpy(), n_imp)
    return AllPairsVerification(n_pairs, n_gen, n_imp, tar, auc, fp, tp)
