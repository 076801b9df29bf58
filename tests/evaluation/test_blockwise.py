"""Blockwise full-ranking metrics against a plain per-query loop (stable sort of each row, junk
dropped, precision counted hit by hit) and against hand-computed rankings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bctkit.errors import DataError
from bctkit.evaluation.blockwise import full_ranking, indexed_cmc, summarize
from tests.evaluation.sort_ranking import retrieval_metrics


def loop_reference(q, qid, g, gid, qcam=None, gcam=None, junk=None, exclude_self=False):
    """Per query (AP, trapezoid AP, AP@R, R-precision, first rank) or None, by explicit loops."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    out = []
    for i in range(len(q)):
        scores = (g @ q[i]).astype(np.float32)
        order = sorted(range(len(g)), key=lambda j: (-float(scores[j]), j))
        ranked = []
        for j in order:
            if junk is not None and junk[j]:
                continue
            if exclude_self and j == i:
                continue
            if qcam is not None and gid[j] == qid[i] and gcam[j] == qcam[i]:
                continue
            ranked.append(gid[j] == qid[i])
        n_rel = sum(ranked)
        if n_rel == 0:
            out.append(None)
            continue
        ap = trap = ap_r = 0.0
        hits = 0
        in_top_r = 0
        first = None
        for pos, rel in enumerate(ranked, start=1):
            if not rel:
                continue
            hits += 1
            first = first or pos
            precision = hits / pos
            before = (hits - 1) / (pos - 1) if pos > 1 else 1.0
            ap += precision
            trap += (precision + before) / 2
            if pos <= n_rel:
                ap_r += precision
                in_top_r += 1
        out.append((ap / n_rel, trap / n_rel, ap_r / n_rel, in_top_r / n_rel, first))
    return out


def compare(per, ref, ks=(1, 3, 5)):
    valid = [r for r in ref if r is not None]
    has = per["n_rel"].numpy() > 0
    assert has.tolist() == [r is not None for r in ref]
    for col, key in enumerate(("ap", "ap_trapezoid", "ap_r", "r_prec", "first")):
        np.testing.assert_allclose(per[key].numpy()[has], [r[col] for r in valid], rtol=0, atol=1e-12)
    summary = summarize(per, ks=ks)
    assert summary["n_queries"] == len(valid)
    assert summary["map"] == pytest.approx(np.mean([r[0] for r in valid]), abs=1e-12)
    for k in ks:
        assert summary[f"top{k}"] == pytest.approx(np.mean([r[4] <= k for r in valid]), abs=1e-12)


@pytest.mark.parametrize("block,block_gallery", [(1, 1), (7, 13), (1000, 100000)])
def test_random_with_cameras_and_junk(block, block_gallery):
    rng = np.random.default_rng(block)
    q = rng.normal(size=(40, 6)).astype(np.float32)
    g = rng.normal(size=(150, 6)).astype(np.float32)
    qid, gid = rng.integers(0, 12, 40), rng.integers(0, 15, 150)
    qcam, gcam = rng.integers(0, 3, 40), rng.integers(0, 3, 150)
    junk = rng.random(150) < 0.1
    per = full_ranking(q, qid, g, gid, query_cams=qcam, gallery_cams=gcam, gallery_junk=junk,
                       block=block, block_gallery=block_gallery)
    compare(per, loop_reference(q, qid, g, gid, qcam, gcam, junk))


def test_exact_ties_follow_the_gallery_order():
    # +-0.5 in 4 dims: unit vectors, scores exact multiples of 0.25, many equal scores
    rng = np.random.default_rng(3)
    x = (rng.integers(0, 2, (120, 4)) - 0.5).astype(np.float32)
    ids = rng.integers(0, 6, 120)
    per = full_ranking(x, ids, x, ids, exclude_self=True, block=5, block_gallery=11)
    compare(per, loop_reference(x, ids, x, ids, exclude_self=True))


def test_zero_and_tiny_negative_scores():
    q = np.array([[1.0, 0.0]], np.float32)
    g = np.array([[-0.0, 1.0], [0.0, 1.0], [-1e-30, 1.0]], np.float32)  # scores 0, 0, -1e-30
    per = full_ranking(q, [1], g, [0, 1, 1], block_gallery=1)
    # item 0 ties with item 1 and ranks first by index; item 2 (sign bit set) ranks last
    assert per["first"].item() == 2 and per["ap"].item() == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_hand_built_ranking():
    # one query at angle 0; gallery items at decreasing cosine: ranks are the gallery order
    angles = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    g = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    gid = [9, 1, 2, 1, 1, 3]  # relevant (id 1) at ranks 2, 4, 5
    per = full_ranking(np.array([[1.0, 0.0]], np.float32), [1], g, gid)
    assert per["ap"].item() == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)
    trapezoid = ((1 / 2 + 0) / 2 + (2 / 4 + 1 / 3) / 2 + (3 / 5 + 2 / 4) / 2) / 3
    assert per["ap_trapezoid"].item() == pytest.approx(trapezoid)
    assert per["ap_r"].item() == pytest.approx((1 / 2) / 3)  # only the hit at rank 2 is within R = 3
    assert per["r_prec"].item() == pytest.approx(1 / 3)
    assert per["first"].item() == 2
    # the same with the item ranked first declared junk: ranks 1, 3, 4
    per = full_ranking(np.array([[1.0, 0.0]], np.float32), [1], g, gid, gallery_junk=[1, 0, 0, 0, 0, 0])
    assert per["ap"].item() == pytest.approx((1 / 1 + 2 / 3 + 3 / 4) / 3)


def test_matches_retrieval_metrics_exclude_self():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    ids = rng.integers(0, 40, 300)
    ref = retrieval_metrics(x, ids, x, ids, ks=(1, 5), exclude_self=True)
    got = summarize(full_ranking(x, ids, x, ids, exclude_self=True, block=17, block_gallery=29), ks=(1, 5))
    for a, b in (("map", "map"), ("map_at_r", "map_at_r"), ("r_precision", "r_precision"),
                 ("recall@1", "top1"), ("recall@5", "top5"), ("n_queries", "n_queries")):
        assert got[b] == pytest.approx(ref[a], abs=1e-12)


def test_queries_without_relevant_items_are_skipped_and_all_missing_is_nan():
    g = np.eye(3, dtype=np.float32)
    per = full_ranking(np.eye(3, dtype=np.float32)[:2], [0, 7], g, [0, 1, 2])
    assert per["n_rel"].tolist() == [1.0, 0.0] and math.isnan(per["ap"][1].item())
    assert summarize(per)["n_queries"] == 1
    with pytest.warns(UserWarning, match="no query"):
        assert math.isnan(summarize(full_ranking(g, [5, 6, 7], g, [0, 1, 2]))["map"])


def test_bad_input_is_a_one_line_error():
    x = np.ones((3, 2), np.float32)
    with pytest.raises(DataError, match="gallery_ids has 2 labels"):
        full_ranking(x, [0, 1, 2], x, [0, 1])
    with pytest.raises(DataError, match="block sizes"):
        full_ranking(x, [0, 1, 2], x, [0, 1, 2], block=0)
    with pytest.raises(DataError, match="gallery_junk"):
        full_ranking(x, [0, 1, 2], x, [0, 1, 2], gallery_junk=[True])
    with pytest.raises(DataError, match="NaN"):
        full_ranking(np.full((1, 2), np.nan, np.float32), [0], x, [0, 1, 2])


def test_memory_is_bounded_by_the_blocks(monkeypatch):
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        out = real(a, b)
        seen.append(out.numel())
        return out

    real_mm = torch.mm

    def spy_mm(a, b, **kwargs):
        out = real_mm(a, b, **kwargs)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    monkeypatch.setattr(torch, "mm", spy_mm)
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(64, 4)).astype(np.float32), rng.normal(size=(500, 4)).astype(np.float32)
    full_ranking(q, rng.integers(0, 50, 64), g, rng.integers(0, 50, 500), block=8, block_gallery=32)
    assert len(seen) >= 8 * 16 and max(seen) <= 8 * 32  # 8 query blocks x 16 gallery tiles at least


def test_indexed_cmc_flat_equals_exact_and_reports_recall():
    rng = np.random.default_rng(2)
    q = rng.normal(size=(30, 8)).astype(np.float32)
    g = rng.normal(size=(200, 8)).astype(np.float32)
    qid, gid = rng.integers(0, 20, 30), rng.integers(0, 20, 200)
    qcam, gcam = rng.integers(0, 2, 30), rng.integers(0, 2, 200)
    junk = rng.random(200) < 0.1
    exact = summarize(full_ranking(q, qid, g, gid, query_cams=qcam, gallery_cams=gcam, gallery_junk=junk),
                      ks=(1, 5))
    got = indexed_cmc(q, qid, g, gid, (1, 5), "Flat", query_cams=qcam, gallery_cams=gcam, gallery_junk=junk)
    assert got["top1"] == pytest.approx(exact["top1"]) and got["top5"] == pytest.approx(exact["top5"])
    assert got["n_queries"] == exact["n_queries"]
    assert got["index_recall@1"] == 1.0 and got["index_recall@5"] == 1.0
    approx = indexed_cmc(q, qid, g, gid, (5,), "IVF4,Flat", nprobe=1)
    assert 0.0 < approx["index_recall@5"] <= 1.0


def test_query_blocks_bound_the_relevant_pairs(monkeypatch):
    import bctkit.evaluation.blockwise as bw

    monkeypatch.setattr(bw, "MAX_PAIRS", 6)
    rng = np.random.default_rng(8)
    q = rng.normal(size=(30, 5)).astype(np.float32)
    g = rng.normal(size=(90, 5)).astype(np.float32)
    qid = rng.integers(0, 5, 30)
    gid = rng.permutation(np.array([0, 1, 2, 3, 0, 1] + [4] * 84))  # ids 0-3: 1 or 2 items, id 4: 84
    sorted_gid = torch.sort(torch.as_tensor(gid)).values
    blocks = list(bw._query_blocks(torch.arange(30), torch.as_tensor(qid), sorted_gid, 4))
    assert sorted(torch.cat(blocks).tolist()) == list(range(30))
    for b in blocks:
        pairs = sum(int((gid == qid[i]).sum()) for i in b.tolist())
        assert len(b) <= 4 and (pairs <= 6 or len(b) == 1)
    assert max(len(b) for b in blocks) > 1 and min(len(b) for b in blocks) == 1
    per = full_ranking(q, qid, g, gid, block=4, block_gallery=16)
    compare(per, loop_reference(q, qid, g, gid))
