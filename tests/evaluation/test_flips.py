"""Negative and positive flips: a hand-counted case, a hand-built split protocol, and every protocol's
per-query top-1 hits against the top-1 it reports."""

import re

import numpy as np
import pytest
import torch

from bctkit.errors import DataError
from bctkit.evaluation.flips import flip_rates, flip_table
from bctkit.evaluation.protocols import EvalProtocol, evaluate_models
from bctkit.evaluation.protocols.ijb import IJBProtocol
from bctkit.evaluation.protocols.loo import LeaveOneOutProtocol
from bctkit.evaluation.protocols.reid import ReIDProtocol
from bctkit.evaluation.protocols.retrieval import QueryGalleryProtocol, RankingOptions
from bctkit.features import FeatureSet
from tests.evaluation.protocols.test_ijb import _feats, make_ijb


def test_hand_counted_rates():
    ref = torch.tensor([1, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    new = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool)
    # right before, wrong now: queries 1 and 5; wrong before, right now: query 3
    assert flip_rates(ref, new) == (2 / 8, 1 / 8)
    assert flip_rates(ref, ref) == (0.0, 0.0)
    with pytest.raises(DataError, match="same non-empty list of queries"):
        flip_rates(ref, new[:7])


def _at(angles):
    a = np.radians(angles)
    return torch.tensor(np.stack([np.cos(a), np.sin(a)], 1), dtype=torch.float32)


def test_hand_built_split_protocol():
    """Two classes, gallery = the first image of each (at 0 and 90 degrees), four probes. The old
    model puts probes at 10, 80, 50, 40: right, right, wrong (class 0's probe nearer 90), wrong. The
    new model at 10, 30, 60, 20: right, wrong, right, wrong (class 1's probe at 20 is nearer 0)."""
    labels = torch.tensor([0, 1, 0, 1, 0, 1])  # gallery rows 0 and 1, probes 2..5
    old = _at([0, 90, 10, 80, 50, 40])
    new = _at([0, 90, 10, 30, 60, 20])
    proto = EvalProtocol("hand", labels, 1, (), (1,), verification=False, retrieval=False)
    fs = {n: FeatureSet(f, labels, {"model": n}) for n, f in (("old", old), ("new", new))}
    _, pairs = evaluate_models(fs, proto)
    assert pairs[("old", "old")].top1_hits.tolist() == [True, True, False, False]
    # new queries on the new gallery: 10 -> 0 (right), 30 -> 0 (wrong), 60 -> 90 (wrong), 20 -> 0 (wrong)
    table = {(f["query_model"], f["gallery_model"]): f for f in flip_table(pairs)}
    f = table[("new", "new")]
    assert pairs[("new", "new")].top1_hits.tolist() == [True, False, False, False]
    assert (f["negative_flips"], f["positive_flips"], f["n"]) == (1, 0, 4)
    assert f["negative_flip_rate"] == 0.25 and f["positive_flip_rate"] == 0.0
    # new queries on the old gallery (0 and 90): 10 right, 30 wrong, 60 -> 90 wrong, 20 -> 0 wrong
    assert table[("new", "old")]["negative_flips"] == 1
    assert ("old", "old") not in table
    assert f["protocol"] == _top1(pairs[("new", "new")])["protocol"]


def test_no_flips_where_no_query_counts_for_top1():
    """Re-id where every query's only match shares its camera (junk): top-1 is NaN, and the flip
    table is empty instead of an error."""
    pids, cams = np.array([1, 2, 3, 1, 2, 3, 4, 5]), np.array([1, 1, 1, 1, 1, 1, 2, 2])
    proto = ReIDProtocol("junk", pids, cams, 3, options=RankingOptions(ks=(1,)))
    fs = {n: FeatureSet(torch.randn(8, 4), torch.from_numpy(pids), {"model": n}) for n in ("old", "new")}
    with pytest.warns(UserWarning, match="no query has a relevant gallery item"):
        records, pairs = evaluate_models(fs, proto)
    assert all(np.isnan(r["value"]) for r in records if r["metric"] == "top1")
    assert flip_table(pairs) == []


def _top1(res):
    return next(r for r in res.records if r["metric"] == "top1")


def test_split_loo_retrieval_reid_hits_give_their_top1():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 90)
    q, g = (torch.from_numpy(rng.normal(size=(90, 6)).astype(np.float32)) for _ in range(2))
    split = EvalProtocol("r", torch.from_numpy(labels), 1, (), (1, 5), verification=False, retrieval=False)
    loo = LeaveOneOutProtocol("r", labels, ks=(1, 5))
    ret = QueryGalleryProtocol("r", labels, 30)
    cams = rng.integers(1, 4, 90)
    reid = ReIDProtocol("r", np.where(labels == 0, -1, labels), cams, 30)
    for proto in (split, loo, ret, reid):
        res = proto.evaluate_pair(q, g, "all")
        rec = _top1(res)
        assert res.top1_hits is not None and len(res.top1_hits) == rec["n"], proto.name
        assert float(res.top1_hits.double().mean()) == pytest.approx(rec["value"], abs=1e-12), proto.name


def test_ijb_hits_are_g1_then_g2_mated_probes(tmp_path):
    tiny = make_ijb(tmp_path, seed=3)
    proto = IJBProtocol.from_root(tiny.root, "ijbc", fars=(1e-1,), fpirs=(), topk=(1,))
    q, g = _feats(tiny, 1)
    res = proto.evaluate_pair(torch.from_numpy(q), torch.from_numpy(g), "all")
    rec = _top1(res)
    m1, m2 = map(int, re.search(r"(\d+) / (\d+) of them mated", rec["protocol"]).groups())
    hits = res.top1_hits.double()
    assert len(hits) == m1 + m2 == rec["n"]
    assert (hits[:m1].mean() + hits[m1:].mean()) / 2 == pytest.approx(rec["value"], abs=1e-12)
