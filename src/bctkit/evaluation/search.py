"""Exact blockwise top-k inner-product search (torch) and a faiss-cpu wrapper.

``topk_search`` never materialises the full query x gallery score matrix: it walks query blocks and,
inside each, gallery blocks, keeping a running top-k that is merged with each block's top-k. Peak
extra memory is one block_queries x block_gallery score tile plus O(block_queries * k).
Scores are raw inner products: normalise the features first for cosine similarity.

Ranking rule (shared by CMC, top-k and the retrieval metrics): decreasing score, and among equal
scores the lower gallery index first, i.e. the order of a stable sort by decreasing score. torch.topk
alone leaves the order of ties unspecified, so the results are made to follow the rule.
"""

from __future__ import annotations

import numpy as np
import torch

from bctkit.errors import DataError

ArrayLike = torch.Tensor | np.ndarray


def as_feature_matrix(x: ArrayLike, name: str) -> torch.Tensor:
    """Return ``x`` as a 2-D float32 CPU tensor; DataError when it is not a feature matrix."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise DataError(f"{name} must be a 2-D (n, d) feature matrix, got shape {tuple(t.shape)}")
    if not torch.is_floating_point(t):
        t = t.to(torch.float32)
    t = t.detach().to("cpu", torch.float32)
    step = max(1, (1 << 22) // max(1, t.shape[1]))  # check in row chunks: bounded temporary memory
    for s in range(0, t.shape[0], step):
        if not torch.isfinite(t[s : s + step]).all():
            raise DataError(f"{name} contains NaN or Inf; expected finite features")
    return t


def check_pair(queries: torch.Tensor, gallery: torch.Tensor, q_name: str, g_name: str) -> None:
    """Raise DataError when the gallery is empty or the two feature dimensions differ."""
    if gallery.shape[0] == 0:
        raise DataError(f"{g_name} is empty; expected at least one gallery item")
    if queries.shape[1] != gallery.shape[1]:
        raise DataError(
            f"{q_name} has dim {queries.shape[1]} but {g_name} has dim {gallery.shape[1]}; "
            "expected equal feature dimensions"
        )


def check_k_within_gallery(k: int, n_gallery: int, exclude_self: bool) -> None:
    """DataError when a top-k metric asks for more items than a query searches (100 % by construction)."""
    if exclude_self and k > n_gallery - 1:
        raise DataError(
            f"k={k} exceeds the gallery size {n_gallery} less the query's own item; "
            f"expected k <= {n_gallery - 1}"
        )
    if k > n_gallery:
        raise DataError(f"k={k} exceeds the gallery size {n_gallery}; expected k <= {n_gallery}")


def _order_ties(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each row's (score, index) pairs: decreasing score, equal scores by increasing index."""
    idx, pos = idx.sort(dim=1)
    vals, pos = vals.gather(1, pos).sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, pos)


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first k of a stable sort by decreasing score (ties: lower column first).

    At torch.topk's cost: topk of k + 1 finds the set, which is ambiguous only in rows where the
    k-th and (k+1)-th scores are equal. There, the scores above the k-th are the leading entries
    of topk's answer whatever it did with ties, and the rest are the lowest-indexed columns equal
    to the k-th score.
    """
    n = scores.shape[1]
    vals, idx = scores.topk(min(k + 1, n), dim=1)
    if k < n:
        tied = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten()
        vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
        if tied.numel():
            kth = vals[tied, k - 1 :]
            n_above = (vals[tied] > kth).sum(1, keepdim=True)
            first_equal = _first_equal_columns(scores, tied, kth, k - n_above, k)
            slot = torch.arange(k)
            from_equal = slot >= n_above
            pick = first_equal.gather(1, (slot - n_above).clamp(min=0))
            idx[tied] = torch.where(from_equal, pick, idx[tied])
            vals[tied] = torch.where(from_equal, kth, vals[tied])
    return _order_ties(vals, idx)


def _equal_columns(matches: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, k): each row's first k True columns of ``matches``, increasing; filler 0 past the last."""
    r, c = torch.nonzero(matches, as_tuple=True)  # row-major: columns increase within a row
    counts = torch.bincount(r, minlength=matches.shape[0])
    pos = torch.arange(r.numel()) - (torch.cumsum(counts, 0) - counts)[r]
    keep = pos < k
    out = torch.zeros((matches.shape[0], k), dtype=torch.int64)
    out[r[keep], pos[keep]] = c[keep]
    return out


def _first_equal_columns(
    scores: torch.Tensor, tied: torch.Tensor, value: torch.Tensor, need: torch.Tensor, k: int
) -> torch.Tensor:
    """For rows ``tied`` of ``scores``: the first k columns equal to ``value`` (``need`` exist).

    Dense ties are found in a short prefix of the row; rows with too few matches there are
    searched in full: a few rows on their own, many by comparing the whole tile against a per-row
    target (NaN matches nothing), which avoids copying most of the tile.
    """
    n = scores.shape[1]
    prefix = scores[tied, : min(n, max(1024, 8 * k))] == value
    cols = _equal_columns(prefix, k)
    short = torch.nonzero(prefix.sum(1, keepdim=True) < need)[:, 0]
    if 4 * short.numel() <= scores.shape[0]:
        if short.numel():
            cols[short] = _equal_columns(scores[tied[short]] == value[short], k)
    else:
        target = torch.full((scores.shape[0], 1), torch.nan, dtype=scores.dtype)
        target[tied[short]] = value[short]
        cols[short] = _equal_columns(scores == target, k)[tied[short]]
    return cols


def topk_search(
    queries: ArrayLike,
    gallery: ArrayLike,
    k: int,
    block_queries: int = 2048,
    block_gallery: int = 32768,
    exclude_self: bool = False,
    cosine: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product: (scores (Nq, k) float32, indices (Nq, k) int64), best first.

    Equal scores rank the lower gallery index first. k is clamped to the gallery size.
    ``exclude_self`` drops gallery item i from query i's results (query and gallery are the same
    set; needs equal lengths). ``cosine``: rows are scaled to unit length one block at a time (no
    normalised copy of the gallery). Memory stays bounded by the blocks.
    """
    q = as_feature_matrix(queries, "queries")
    g = as_feature_matrix(gallery, "gallery")
    check_pair(q, g, "queries", "gallery")
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}")
    if block_queries < 1 or block_gallery < 1:
        raise DataError("block_queries and block_gallery must be >= 1")
    if exclude_self and q.shape[0] != g.shape[0]:
        raise DataError(
            f"exclude_self needs queries and gallery of equal length, got {q.shape[0]} and {g.shape[0]}"
        )
    n_q, n_g = q.shape[0], g.shape[0]
    k_eff = min(k, n_g - 1 if exclude_self else n_g)
    if k_eff < 1:
        raise DataError("exclude_self with a one-item gallery leaves nothing to search")
    out_s = torch.empty((n_q, k_eff), dtype=torch.float32)
    out_i = torch.empty((n_q, k_eff), dtype=torch.int64)
    tile = torch.empty((min(block_queries, n_q), min(block_gallery, n_g)), dtype=torch.float32)
    for qs in range(0, n_q, block_queries):
        qb = q[qs : qs + block_queries]
        if cosine:
            qb = torch.nn.functional.normalize(qb, dim=1)
        best_s: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for gs in range(0, n_g, block_gallery):
            gb = g[gs : gs + block_gallery]
            if cosine:
                gb = torch.nn.functional.normalize(gb, dim=1)
            # reuse one buffer for every tile (partial tiles use a contiguous prefix of it)
            sc = tile.view(-1)[: qb.shape[0] * gb.shape[0]].view(qb.shape[0], gb.shape[0])
            torch.mm(qb, gb.T, out=sc)
            if exclude_self:
                rows = torch.arange(qb.shape[0])
                cols = rows + qs - gs
                ok = (cols >= 0) & (cols < gb.shape[0])
                sc[rows[ok], cols[ok]] = -torch.inf
            bs, bi = stable_topk(sc, min(k_eff, gb.shape[0]))
            bi += gs
            if best_s is None:
                best_s, best_i = bs, bi
            else:
                # earlier blocks hold lower indices and each part is in rule order, so a stable
                # sort of the concatenation keeps equal scores in increasing gallery index
                cat_s = torch.cat([best_s, bs], dim=1)
                cat_i = torch.cat([best_i, bi], dim=1)
                cat_s, pos = cat_s.sort(dim=1, descending=True, stable=True)
                best_s, best_i = cat_s[:, :k_eff], cat_i.gather(1, pos[:, :k_eff])
        out_s[qs : qs + qb.shape[0]] = best_s
        out_i[qs : qs + qb.shape[0]] = best_i
    return out_s, out_i


class FaissIndex:
    """Inner-product faiss index built from an index_factory string ("Flat", "IVF1024,Flat", ...).

    Indexes that need training (IVF, PQ) are trained on the gallery itself, or on ``train`` when
    given. ``nprobe`` sets the number of inverted lists visited by IVF indexes.
    """

    def __init__(
        self,
        gallery: ArrayLike,
        factory: str = "Flat",
        nprobe: int | None = None,
        train: ArrayLike | None = None,
    ) -> None:
        import faiss

        g = as_feature_matrix(gallery, "gallery")
        if g.shape[0] == 0:
            raise DataError("gallery is empty; expected at least one gallery item")
        self.dim = int(g.shape[1])
        self.factory = factory
        self.index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        gx = np.ascontiguousarray(g.numpy())
        if not self.index.is_trained:
            tx = gx
            if train is not None:
                tx = np.ascontiguousarray(as_feature_matrix(train, "train").numpy())
            self.index.train(tx)
        self.index.add(gx)
        if nprobe is not None:
            faiss.extract_index_ivf(self.index).nprobe = int(nprobe)

    @property
    def ntotal(self) -> int:
        """Number of indexed gallery items."""
        return int(self.index.ntotal)

    def search(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores float32, indices int64) per query; k is clamped to the gallery size."""
        q = as_feature_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise DataError(f"queries have dim {q.shape[1]} but the index has dim {self.dim}; expected equal")
        if k < 1:
            raise DataError(f"k must be >= 1, got {k}")
        scores, idx = self.index.search(np.ascontiguousarray(q.numpy()), min(k, self.ntotal))
        return scores, idx.astype(np.int64)


def faiss_search(
    queries: ArrayLike,
    gallery: ArrayLike,
    k: int,
    factory: str = "Flat",
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Build a FaissIndex on ``gallery`` and return its top-k (scores, indices) for ``queries``."""
    q = as_feature_matrix(queries, "queries")
    g = as_feature_matrix(gallery, "gallery")
    check_pair(q, g, "queries", "gallery")
    return FaissIndex(g, factory=factory, nprobe=nprobe).search(q, k)


def encode_ids(*id_arrays: ArrayLike) -> list[torch.Tensor]:
    """Map identity labels of any dtype (ints, strings) to shared int64 codes, one tensor per input."""
    arrays = [np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a).ravel() for a in id_arrays]
    sizes = [a.shape[0] for a in arrays]
    if sum(sizes) == 0:
        return [torch.empty(0, dtype=torch.int64) for _ in arrays]
    _, codes = np.unique(np.concatenate(arrays), return_inverse=True)
    codes = torch.as_tensor(codes.ravel().astype(np.int64))
    return list(torch.split(codes, sizes))


def normalized(x: ArrayLike, name: str) -> torch.Tensor:
    """Validated float32 features with unit L2 rows (cosine similarity = inner product)."""
    return torch.nn.functional.normalize(as_feature_matrix(x, name), dim=1)
