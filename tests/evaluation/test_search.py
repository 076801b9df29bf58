"""Blockwise top-k against a full matmul + topk, and faiss against topk_search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bctkit.errors import DataError
from bctkit.evaluation.search import FaissIndex, encode_ids, faiss_search, topk_search


def feats(seed: int, n: int, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


@pytest.mark.parametrize(
    ("n_q", "n_g", "k", "bq", "bg"),
    [(37, 101, 5, 7, 9), (10, 50, 1, 3, 50), (5, 8, 8, 2, 3), (20, 30, 10, 64, 4), (1, 3, 2, 1, 1)],
)
def test_topk_matches_full_matmul(n_q: int, n_g: int, k: int, bq: int, bg: int) -> None:
    q, g = feats(0, n_q), feats(1, n_g)
    s, i = topk_search(q, g, k, block_queries=bq, block_gallery=bg)
    full = (q @ g.T).topk(k, dim=1)
    assert s.shape == (n_q, k) and i.dtype == torch.int64
    torch.testing.assert_close(s, full.values, rtol=0, atol=1e-5)
    assert torch.equal(i, full.indices)


def test_topk_exclude_self_and_clamping() -> None:
    g = feats(2, 23)
    s, i = topk_search(g, g, 4, block_queries=5, block_gallery=6, exclude_self=True)
    m = g @ g.T
    m.fill_diagonal_(-torch.inf)
    full = m.topk(4, dim=1)
    torch.testing.assert_close(s, full.values, rtol=0, atol=1e-5)
    assert torch.equal(i, full.indices)
    assert not (i == torch.arange(23)[:, None]).any()
    s, i = topk_search(g[:3], g, 100)  # k larger than the gallery is clamped
    assert i.shape == (3, 23)
    assert torch.equal(torch.sort(i, dim=1).values, torch.arange(23).expand(3, 23))


def tied(seed: int, n_q: int, n_g: int, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Small-integer queries against a one-hot gallery: scores are exact, duplicates are true ties."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 3, (n_q, d), generator=gen).float()
    g = torch.eye(d)[torch.randint(0, d, (n_g,), generator=gen)]
    return q, g


def stable_ranking(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The rule: descending score, equal scores in increasing gallery index (a stable sort)."""
    return torch.from_numpy(np.argsort(-scores.numpy(), axis=1, kind="stable")[:, :k].copy())


@pytest.mark.parametrize(
    ("k", "bq", "bg"), [(1, 64, 32768), (3, 5, 7), (12, 4, 5), (40, 3, 64), (150, 7, 33), (150, 2048, 32768)]
)
def test_topk_ties_lower_index_first(k: int, bq: int, bg: int) -> None:
    q, g = tied(0, 25, 150)
    s, i = topk_search(q, g, k, block_queries=bq, block_gallery=bg)
    full = q @ g.T
    want = stable_ranking(full, k)
    assert torch.equal(i, want)
    assert torch.equal(s, full.gather(1, want))


@pytest.mark.parametrize(("k", "bq", "bg"), [(1, 8, 9), (6, 5, 7), (59, 64, 13)])
def test_topk_ties_exclude_self(k: int, bq: int, bg: int) -> None:
    _, g = tied(1, 0, 60)
    s, i = topk_search(g, g, k, block_queries=bq, block_gallery=bg, exclude_self=True)
    full = g @ g.T
    full.fill_diagonal_(-torch.inf)
    want = stable_ranking(full, k)
    assert torch.equal(i, want)
    assert torch.equal(s, full.gather(1, want))


def test_topk_numpy_input() -> None:
    q, g = feats(3, 6).numpy(), feats(4, 40).numpy()
    s, i = topk_search(q, g, 3, block_gallery=7)
    assert torch.equal(i, torch.from_numpy(q @ g.T).topk(3, dim=1).indices)


def test_faiss_flat_matches_topk() -> None:
    q, g = feats(5, 30, 32), feats(6, 500, 32)
    fs, fi = faiss_search(q, g, 10)
    ts, ti = topk_search(q, g, 10, block_gallery=64)
    np.testing.assert_allclose(fs, ts.numpy(), atol=1e-4)
    assert np.array_equal(fi, ti.numpy())


def test_faiss_ivf_full_probe_is_exact() -> None:
    q, g = feats(7, 20, 8), feats(8, 400, 8)
    index = FaissIndex(g, factory="IVF4,Flat", nprobe=4)
    assert index.ntotal == 400
    fs, fi = index.search(q, 5)
    ts, ti = topk_search(q, g, 5)
    np.testing.assert_allclose(fs, ts.numpy(), atol=1e-4)
    assert np.array_equal(fi, ti.numpy())


def test_encode_ids_shared_codes() -> None:
    a, b = encode_ids(np.array(["x", "y", "x"]), ["z", "y"])
    assert a.tolist() == [0, 1, 0] and b.tolist() == [2, 1]


def test_errors() -> None:
    q, g = feats(0, 4), feats(1, 6)
    with pytest.raises(DataError, match="empty"):
        topk_search(q, g[:0], 3)
    with pytest.raises(DataError, match="dim"):
        topk_search(q, feats(1, 6, 8), 3)
    with pytest.raises(DataError, match="NaN"):
        topk_search(q, torch.full((6, 16), float("nan")), 3)
    with pytest.raises(DataError, match="2-D"):
        topk_search(q[0], g, 3)
    with pytest.raises(DataError, match="k must be"):
        topk_search(q, g, 0)
    with pytest.raises(DataError, match="equal length"):
        topk_search(q, g, 2, exclude_self=True)
    with pytest.raises(DataError, match="dim"):
        faiss_search(q, feats(1, 6, 8), 3)
    with pytest.raises(DataError, match="empty"):
        FaissIndex(g[:0])
