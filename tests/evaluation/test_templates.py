"""Template features and pair scores against plain Python loops."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from bctkit.errors import DataError
from bctkit.evaluation.templates import index_of, pair_scores, template_features


def brute_templates(feats, tids, mids):
    groups: dict = defaultdict(lambda: defaultdict(list))
    for f, t, m in zip(feats, tids, mids, strict=True):
        groups[t][m].append(f)
    keys = sorted(groups)
    out = []
    for t in keys:
        v = sum(np.mean(imgs, axis=0) for imgs in groups[t].values())
        out.append(v / np.linalg.norm(v))
    return np.array(keys), np.array(out)


@pytest.mark.parametrize("seed", range(3))
def test_template_features_match_loops(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 200
    feats = rng.normal(size=(n, 8))
    tids = rng.integers(100, 130, n)
    mids = rng.integers(0, 12, n)  # media ids shared across templates on purpose
    keys, tf = template_features(feats, tids, mids)
    bkeys, btf = brute_templates(feats, tids, mids)
    assert np.array_equal(keys, bkeys)
    np.testing.assert_allclose(tf.numpy(), btf, atol=1e-6)
    # media averaging matters: a plain mean of the images differs for unbalanced media
    plain = np.array([feats[tids == t].mean(0) for t in keys])
    plain /= np.linalg.norm(plain, axis=1, keepdims=True)
    assert not np.allclose(tf.numpy(), plain, atol=1e-3)


def test_one_image_per_template_is_normalised_image() -> None:
    feats = np.array([[3.0, 4.0], [0.0, 2.0]])
    keys, tf = template_features(feats, ["b", "a"], [0, 0])
    assert keys.tolist() == ["a", "b"]
    np.testing.assert_allclose(tf.numpy(), [[0.0, 1.0], [0.6, 0.8]], atol=1e-7)


def test_pair_scores_cross_models_blocks() -> None:
    rng = np.random.default_rng(4)
    fa = rng.normal(size=(30, 6))
    fb = rng.normal(size=(25, 6)) * 3.0
    ia = rng.integers(0, 30, 101)
    ib = rng.integers(0, 25, 101)
    got = pair_scores(fa, fb, ia, ib, block=7)
    want = [
        fa[i] @ fb[j] / (np.linalg.norm(fa[i]) * np.linalg.norm(fb[j])) for i, j in zip(ia, ib, strict=True)
    ]
    assert got.dtype == np.float32 and got.shape == (101,)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_index_of() -> None:
    keys = np.array([3, 7, 9])
    assert index_of(keys, [9, 3, 3]).tolist() == [2, 0, 0]
    with pytest.raises(DataError, match="no template feature"):
        index_of(keys, [4])
    with pytest.raises(DataError, match="no template feature"):
        index_of(keys, [10])


def test_errors() -> None:
    f = np.ones((4, 3))
    with pytest.raises(DataError, match="template_ids"):
        template_features(f, [0, 1, 2], [0, 0, 0, 0])
    with pytest.raises(DataError, match="empty"):
        template_features(f[:0], [], [])
    with pytest.raises(DataError, match="NaN"):
        template_features(np.full((2, 3), np.nan), [0, 1], [0, 0])
    with pytest.raises(DataError, match="dim"):
        pair_scores(f, np.ones((4, 2)), [0], [0])
    with pytest.raises(DataError, match="outside"):
        pair_scores(f, f, [0, 4], [0, 1])
    with pytest.raises(DataError, match="differ in length"):
        pair_scores(f, f, [0, 1], [0])
