"""set_ranking against a stable full sort of each query's scores: random and exactly tied features, a
float16 gallery, block sizes down to one, and bad sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bctkit.errors import DataError
from bctkit.evaluation.setwise import set_ranking


def reference(q: np.ndarray, g: np.ndarray, sets) -> list[tuple[np.ndarray, np.ndarray]]:
    qn = torch.nn.functional.normalize(torch.from_numpy(q).float(), dim=1)
    gn = torch.nn.functional.normalize(torch.from_numpy(g).float(), dim=1)
    scores = (qn @ gn.T).numpy()
    out = []
    for i, s in enumerate(sets):
        order = np.argsort(-scores[i], kind="stable")
        listed = np.isin(order, s)
        out.append((order[listed], np.cumsum(~listed)[listed]))
    return out


@pytest.mark.parametrize("tied, half, block, block_gallery", [
    (True, False, 1, 1), (True, False, 3, 17), (False, True, 2, 64), (False, False, 1024, None)])
def test_against_a_full_sort(tied, half, block, block_gallery):
    rng = np.random.default_rng(block)
    nq, ng = 11, 300
    if tied:  # +-0.5 in 4 dims: exact scores, many equal
        q = (rng.integers(0, 2, (nq, 4)) - 0.5).astype(np.float32)
        g = (rng.integers(0, 2, (ng, 4)) - 0.5).astype(np.float32)
    else:
        q = rng.normal(size=(nq, 5)).astype(np.float32)
        g = rng.normal(size=(ng, 5)).astype(np.float16 if half else np.float32)
    sets = [rng.choice(ng, int(rng.integers(0, 25)), replace=False) for _ in range(nq)]
    got = set_ranking(q, torch.from_numpy(g), sets, block=block, block_gallery=block_gallery)
    for (items, ahead), (want_items, want_ahead) in zip(got, reference(q, g, sets), strict=True):
        assert items.tolist() == want_items.tolist() and ahead.tolist() == want_ahead.tolist()


def test_bad_sets_are_one_line_errors():
    q, g = np.ones((2, 3), np.float32), np.ones((5, 3), np.float32)
    with pytest.raises(DataError, match="sets has 1 entries for 2 queries"):
        set_ranking(q, g, [[0]])
    with pytest.raises(DataError, match=r"sets\[1\] holds an index outside the gallery \[0, 5\)"):
        set_ranking(q, g, [[0], [5]])
    with pytest.raises(DataError, match=r"sets\[0\] names a gallery index twice"):
        set_ranking(q, g, [[1, 1], []])


def test_listed_scores_that_differ_from_the_tiles_are_redone(monkeypatch):
    import bctkit.evaluation.setwise as setwise

    rng = np.random.default_rng(5)
    q, g = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(90, 6)).astype(np.float32)
    sets = [rng.choice(90, 12, replace=False) for _ in range(4)]
    exact = setwise._listed_scores
    calls = []

    def off_by_one(*args):  # as if another BLAS path had rounded every listed score differently
        calls.append(1)
        return torch.nextafter(exact(*args), torch.tensor(2.0))

    monkeypatch.setattr(setwise, "_listed_scores", off_by_one)
    got = set_ranking(q, g, sets, block_gallery=7)
    assert calls == [1]
    for (items, ahead), (want_items, want_ahead) in zip(got, reference(q, g, sets), strict=True):
        assert items.tolist() == want_items.tolist() and ahead.tolist() == want_ahead.tolist()


def test_a_non_finite_gallery_row_is_named():
    g = np.ones((20, 3), np.float16)
    g[13, 1] = np.inf
    with pytest.raises(DataError, match="gallery_feats row 13 contains NaN or Inf"):
        set_ranking(np.ones((1, 3), np.float32), g, [[0]], block_gallery=5)
