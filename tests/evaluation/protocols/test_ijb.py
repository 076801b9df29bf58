"""IJBProtocol on a tiny IJB directory written byte by byte: every record against plain-loop
pooling, brute-force pair and search scores, and hand-counted TAR / CMC / TPIR."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from bctkit.data.sources.ijb import IJBSource
from bctkit.errors import DataError
from bctkit.evaluation.protocols.base import evaluate_models
from bctkit.evaluation.protocols.ijb import (
    IJBProtocol,
    plan_pairs,
    pool_templates,
    pooling_matrix,
    thin_roc,
)
from bctkit.evaluation.templates import template_features
from bctkit.features import FeatureSet
from tests.data.sources.test_ijb import Tiny, make_ijb

FARS = (1e-4, 0.01, 0.1, 0.3)
FPIRS = (0.1, 0.5)
TOPK = (1, 3)


def _pool(t: Tiny, feats: np.ndarray, weighted: bool) -> dict[int, np.ndarray]:
    """Template id -> unit feature, with loops: per media the mean, per template the sum."""
    out = {}
    for tid in sorted(set(t.templates)):
        media: dict[int, list[np.ndarray]] = {}
        for i, (ti, m) in enumerate(zip(t.templates, t.medias, strict=True)):
            if ti == tid:
                f = feats[i].astype(np.float64) * (t.scores[i] if weighted else 1.0)
                media.setdefault(m, []).append(f)
        total = np.zeros(feats.shape[1])
        for fs in media.values():
            total += sum(fs) / len(fs)
        out[tid] = total / math.sqrt(float(total @ total))
    return out


def _tar(scores: list[float], labels: list[int], far: float) -> float:
    imp = sorted((s for s, lab in zip(scores, labels, strict=True) if lab == 0), reverse=True)
    gen = [s for s, lab in zip(scores, labels, strict=True) if lab == 1]
    k = math.floor(Fraction(str(far)) * len(imp))
    if k < 1:
        return math.nan
    thr = imp[k] if k < len(imp) else -math.inf
    return sum(1 for g in gen if g > thr) / len(gen)


def _search(probe: dict[int, np.ndarray], gallery: dict[int, np.ndarray], t: Tiny, g_tids: list[int]
            ) -> tuple[dict[int, float], dict[float, float], int]:
    """(CMC top-k over mated probes, TPIR per FPIR, mated count) by brute force, one gallery."""
    g_subj = [t.subject[g] for g in g_tids]
    hits = {k: 0 for k in TOPK}
    mated_ok, nm_max = [], []
    for p in t.probe:
        s = [float(probe[p] @ gallery[g]) for g in g_tids]
        subj = t.subject[p]
        if subj in g_subj:
            order = sorted(range(len(s)), key=lambda j: (-s[j], j))
            first = next(r for r, j in enumerate(order) if g_subj[j] == subj)
            for k in TOPK:
                hits[k] += first < k
            mated = max(s[j] for j in range(len(s)) if g_subj[j] == subj)
            others = max((s[j] for j in range(len(s)) if g_subj[j] != subj), default=-math.inf)
            mated_ok.append((mated, mated > others))
        else:
            nm_max.append(max(s))
    nm_max.sort(reverse=True)
    tpir = {}
    for f in FPIRS:
        k = max(math.floor(Fraction(str(f)) * len(nm_max)), 1)
        thr = nm_max[k - 1]
        tpir[f] = sum(1 for m, ok in mated_ok if ok and m > thr) / len(mated_ok)
    return {k: hits[k] / len(mated_ok) for k in TOPK}, tpir, len(mated_ok)


def _expected(t: Tiny, q: np.ndarray, g: np.ndarray, weighted: bool) -> dict[str, float]:
    tq, tg = _pool(t, q, weighted), _pool(t, g, weighted)
    scores = [float(tq[a] @ tg[b]) for a, b, _ in t.pairs]
    labels = [lab for _, _, lab in t.pairs]
    out = {f"tar@far={f:.0e}".replace("e-0", "e-"): _tar(scores, labels, f) for f in FARS}
    out["auc"] = float(roc_auc_score(labels, scores))
    res = [_search(tq, tg, t, gal) for gal in (t.g1, t.g2)]
    for k in TOPK:
        out[f"top{k}"] = (res[0][0][k] + res[1][0][k]) / 2
    for f in FPIRS:
        out[f"tpir@fpir={f:.0e}".replace("e-0", "e-")] = (res[0][1][f] + res[1][1][f]) / 2
    out["_mated"] = res[0][2] + res[1][2]
    return out


def _thinned(fpr: np.ndarray, levels: int = 2000) -> list[int]:
    """Indices kept by the ROC thinning, by loops: first, last, and per log-spaced level the last
    point whose FPR is at or below it."""
    keep = {0, len(fpr) - 1}
    for level in np.logspace(-7, 0, levels):
        below = [i for i in range(len(fpr)) if fpr[i] <= level]
        if below:
            keep.add(below[-1])
    return sorted(keep)


@pytest.fixture
def tiny(tmp_path: Path) -> Tiny:
    return make_ijb(tmp_path, seed=3)


def _feats(t: Tiny, seed: int, d: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(7, d))
    q = np.stack([centres[t.subject[tid]] + rng.normal(0, 0.9, d) for tid in t.templates]).astype(np.float32)
    g = (q + rng.normal(0, 0.5, q.shape)).astype(np.float32)
    return q, g


@pytest.mark.parametrize("weighted", [False, True])
def test_records_match_an_independent_computation(tiny: Tiny, weighted: bool) -> None:
    proto = IJBProtocol.from_root(tiny.root, "ijbc", fars=FARS, fpirs=FPIRS, topk=TOPK,
                                  score_weighting=weighted)
    q, g = _feats(tiny, 1)
    res = proto.evaluate_pair(torch.from_numpy(q), torch.from_numpy(g), "all 6 dims")
    want = _expected(tiny, q, g, weighted)
    got = {r["metric"]: r for r in res.records}
    assert set(got) == {k for k in want if not k.startswith("_")}
    for metric, rec in got.items():
        if math.isnan(want[metric]):
            assert math.isnan(rec["value"]), metric
        else:
            assert rec["value"] == pytest.approx(want[metric], abs=1e-9), metric
        assert "all 6 dims" in rec["protocol"] and "IJB-C" in rec["protocol"]
    n_gen = sum(lab for _, _, lab in tiny.pairs)
    assert got["auc"]["n"] == len(tiny.pairs)
    n_imp = len(tiny.pairs) - n_gen
    counts = f"the {len(tiny.pairs)} listed template pairs ({n_gen} genuine, {n_imp} impostor)"
    assert counts in got["auc"]["protocol"]
    assert got["top1"]["n"] == want["_mated"] and got["tpir@fpir=1e-1"]["n"] == len(tiny.probe)
    assert ("detector-score-weighted" in got["top1"]["protocol"]) == weighted
    # ROC curve: sklearn's, on the brute-force scores
    tq, tg = _pool(tiny, q, weighted), _pool(tiny, g, weighted)
    fpr, tpr, _ = roc_curve([lab for *_, lab in tiny.pairs], [float(tq[a] @ tg[b]) for a, b, _ in tiny.pairs])
    assert res.roc is not None
    want_idx = _thinned(fpr)
    np.testing.assert_allclose(res.roc[0], fpr[want_idx], atol=1e-12)
    np.testing.assert_allclose(res.roc[1], tpr[want_idx], atol=1e-12)
    assert res.cmc[1] == pytest.approx(want["top1"]) and res.cmc[3] == pytest.approx(want["top3"])


def test_cross_test_direction(tiny: Tiny) -> None:
    # the first template of a pair and the probes come from the query features: swapping the two
    # models must give what the loops give for the swapped roles, and differ from the original
    proto = IJBProtocol.from_root(tiny.root, "ijbc", fars=FARS, fpirs=FPIRS, topk=TOPK)
    q, g = _feats(tiny, 2)
    qt, gt = torch.from_numpy(q), torch.from_numpy(g)
    ab = {r["metric"]: r["value"] for r in proto.evaluate_pair(qt, gt, "x").records}
    ba = {r["metric"]: r["value"] for r in proto.evaluate_pair(gt, qt, "x").records}
    want_ba = _expected(tiny, g, q, False)
    for metric, value in ba.items():
        assert value == pytest.approx(want_ba[metric], abs=1e-9, nan_ok=True), metric
    assert ab["auc"] != ba["auc"]


def test_self_test_through_evaluate_models(tiny: Tiny) -> None:
    proto = IJBProtocol.from_root(tiny.root, "ijbc", fars=FARS, fpirs=FPIRS, topk=TOPK)
    q, g = _feats(tiny, 4)
    labels = torch.zeros(len(q), dtype=torch.int64)
    fs = {"a": FeatureSet(torch.from_numpy(q), labels, {}), "b": FeatureSet(torch.from_numpy(g), labels, {})}
    records, pairs = evaluate_models(fs, proto)
    assert set(pairs) == {("a", "a"), ("a", "b"), ("b", "a"), ("b", "b")}
    aa = {r["metric"]: r["value"] for r in records if r["query_model"] == "a" and r["gallery_model"] == "a"}
    want = _expected(tiny, q, q, False)
    for metric, value in aa.items():
        assert value == pytest.approx(want[metric], abs=1e-9, nan_ok=True), metric


def test_without_one_n_only_verification(tmp_path: Path) -> None:
    t = make_ijb(tmp_path, one_n=False)
    proto = IJBProtocol.from_root(tmp_path, "ijbc", fars=FARS)
    q, g = _feats(t, 5)
    res = proto.evaluate_pair(torch.from_numpy(q), torch.from_numpy(g), "x")
    assert {r["metric"] for r in res.records} == {"tar@far=1e-4", "tar@far=1e-2", "tar@far=1e-1",
                                                   "tar@far=3e-1", "auc"}
    assert res.cmc == {}
    assert "g1_templates" not in proto.describe()


def test_describe_and_name(tiny: Tiny) -> None:
    proto = IJBProtocol.from_root(tiny.root, "ijbc", fars=FARS, fpirs=FPIRS, topk=TOPK)
    d = proto.describe()
    n_gen = sum(lab for *_, lab in tiny.pairs)
    assert proto.name == "ijbc" and proto.dataset == "IJB-C" and isinstance(proto.source, IJBSource)
    assert d["images"] == len(tiny.names) and d["templates"] == len(set(tiny.templates))
    assert d["pairs"] == len(tiny.pairs) and d["genuine_pairs"] == n_gen
    assert (d["g1_templates"], d["g2_templates"], d["probe_templates"]) == (4, 4, len(tiny.probe))
    assert d["fars"] == list(FARS) and d["fpirs"] == list(FPIRS) and d["topk"] == list(TOPK)
    assert d["score_weighting"] is False


def test_ijbb(tmp_path: Path) -> None:
    t = make_ijb(tmp_path, name="ijbb", seed=7)
    proto = IJBProtocol.from_root(tmp_path, "ijbb", fars=FARS, fpirs=FPIRS, topk=TOPK)
    assert proto.name == "ijbb" and proto.dataset == "IJB-B"
    q, g = _feats(t, 6)
    got = {r["metric"]: r["value"] for r in proto.evaluate_pair(torch.from_numpy(q), torch.from_numpy(g),
                                                                "x").records}
    want = _expected(t, q, g, False)
    for metric, value in got.items():
        assert value == pytest.approx(want[metric], abs=1e-9, nan_ok=True), metric


def test_refusals(tiny: Tiny) -> None:
    with pytest.raises(DataError, match="top-k 5 exceeds gallery G1 of 4 templates"):
        IJBProtocol.from_root(tiny.root, "ijbc", topk=(1, 5))
    with pytest.raises(DataError, match="FAR 0 is outside"):
        IJBProtocol.from_root(tiny.root, "ijbc", fars=(0,))
    with pytest.raises(DataError, match="IJB name 'ijbx'"):
        IJBProtocol.from_root(tiny.root, "ijbx")
    proto = IJBProtocol.from_root(tiny.root, "ijbc", fars=FARS, fpirs=FPIRS, topk=TOPK)
    with pytest.raises(DataError, match=r"features of shape \[3, 6\]"):
        proto.evaluate_pair(torch.zeros(3, 6), torch.zeros(3, 6), "x")
    bad = torch.ones(len(tiny.names), 6)
    bad[5, 2] = float("nan")
    with pytest.raises(DataError, match="NaN or Inf"):
        proto.evaluate_pair(bad, torch.ones(len(tiny.names), 6), "x")


@pytest.mark.parametrize("method", ["matrix", "gather", "auto"])
@pytest.mark.parametrize("n_pairs", [1, 57, 3000])
def test_listed_pair_scores_against_loops(method: str, n_pairs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # tiny score blocks force many row blocks; pairs repeat, and some templates are never listed
    import bctkit.evaluation.protocols.ijb as ijb

    monkeypatch.setattr(ijb, "PAIR_BLOCK_BYTES", 4 * 40 * 3)
    rng = np.random.default_rng(n_pairs)
    q = torch.nn.functional.normalize(torch.randn(90, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    g = torch.nn.functional.normalize(torch.randn(90, 5, generator=torch.Generator().manual_seed(2)), dim=1)
    first = rng.integers(3, 80, n_pairs)
    second = rng.integers(0, 60, n_pairs)
    plan = ijb.plan_pairs(first, second)
    got = ijb.listed_pair_scores(q, g, plan, method=method)
    want = [float(sum(float(q[a, k]) * float(g[b, k]) for k in range(5))) for a, b in zip(first, second,
                                                                                         strict=True)]
    assert got.dtype == np.float32 and got.shape == (n_pairs,)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert plan.density == pytest.approx(n_pairs / (len(set(first)) * len(set(second))))
    with pytest.raises(DataError, match="method 'fast' is unknown"):
        ijb.listed_pair_scores(q, g, plan, method="fast")


@pytest.mark.parametrize("n_rows", [50, 70_000])
def test_plan_pairs_against_unique(n_rows: int) -> None:
    # 70,000 distinct first templates take the int32 sort instead of the 16-bit radix sort
    rng = np.random.default_rng(n_rows)
    first = np.concatenate([np.arange(n_rows), rng.integers(0, n_rows, 5000)]) * 2 + 1
    second = rng.integers(0, 300, len(first))
    plan = plan_pairs(first, second)
    rows, row_pos = np.unique(first, return_inverse=True)
    cols, col_pos = np.unique(second, return_inverse=True)
    np.testing.assert_array_equal(plan.rows, rows)
    np.testing.assert_array_equal(plan.cols, cols)
    np.testing.assert_array_equal(plan.col_pos, col_pos)
    np.testing.assert_array_equal(plan.order, np.argsort(row_pos, kind="stable"))
    np.testing.assert_array_equal(plan.row_pos, row_pos[plan.order])
    with pytest.raises(DataError, match="non-negative integer row indices"):
        plan_pairs(np.array([0, -1]), np.array([0, 1]))


def test_thin_roc_keeps_curve_points() -> None:
    # a long staircase: the thinned curve is a subset of its points, the loop rule's subset
    rng = np.random.default_rng(0)
    fpr = np.concatenate([[0.0], np.sort(rng.uniform(0, 1, 5000)), [1.0]])
    tpr = np.concatenate([[0.0], np.sort(rng.uniform(0, 1, 5000)), [1.0]])
    f, t = thin_roc(fpr, tpr, levels=300)
    idx = _thinned(fpr, levels=300)
    np.testing.assert_array_equal(f, fpr[idx])
    np.testing.assert_array_equal(t, tpr[idx])
    assert len(f) <= 302


@pytest.mark.parametrize("weighted", [False, True])
def test_pooling_matrix_equals_template_features(weighted: bool) -> None:
    # the sparse pooling map against the library's template_features (index_add), media shared
    # across templates, on random features; weights applied to the images first
    rng = np.random.default_rng(1)
    tids = rng.integers(0, 40, 500) * 7 + 3
    mids = rng.integers(0, 60, 500)
    feats = torch.from_numpy(rng.standard_normal((500, 9)).astype(np.float32))
    w = rng.uniform(0.1, 1.0, 500)
    keys, matrix = pooling_matrix(tids, mids, w if weighted else None)
    ref_in = feats.double() * torch.from_numpy(w)[:, None] if weighted else feats
    ref_keys, ref = template_features(ref_in, tids, mids)
    np.testing.assert_array_equal(keys, ref_keys)
    np.testing.assert_allclose(pool_templates(matrix, feats, chunk=4).numpy(), ref.numpy(), atol=1e-6)


def test_bctkit_evaluate_protocol_ijbc_with_feature_files(tiny: Tiny, tmp_path: Path) -> None:
    """The CLI wires the protocol: --new's features are the probes / first templates, --old's the
    gallery / second ones, rows in the source's order; the certificate judges the first headline
    metric that is measurable."""
    import json

    from bctkit.cli import main

    q, g = _feats(tiny, 1)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "g.npy", g)
    out = tmp_path / "ev"
    rates = [["--fars", *map(str, FARS)], ["--fpirs", *map(str, FPIRS)], ["--topk", *map(str, TOPK)]]
    assert main(["evaluate", "--protocol", "ijbc", "--data", str(tiny.root), "--old", str(tmp_path / "g.npy"),
                 "--new", f"new={tmp_path / 'q.npy'}", "--out", str(out), "--quiet",
                 *[a for r in rates for a in r]]) == 0
    report = json.loads((out / "report.json").read_text())
    got = {r["metric"]: r["value"] for r in report["results"]
           if (r["query_model"], r["gallery_model"]) == ("new", "old")}
    want = _expected(tiny, q, g, False)
    for metric, value in got.items():
        assert (math.isnan(want[metric]) and value is None) or value == pytest.approx(want[metric], abs=1e-9)
    cert = json.loads((out / "certificates" / "new__old.json").read_text())
    assert math.isnan(want["tar@far=1e-4"])  # too few impostors here: the next headline metric judges
    assert cert["criterion"]["metric"] == "top1" and cert["protocol"]["pairs"] == len(tiny.pairs)


def test_bctkit_evaluate_ijbc_tar_mode_insightface(tiny: Tiny, tmp_path: Path) -> None:
    """--tar-mode insightface reaches the protocol: TAR is the TPR at the sklearn ROC point nearest the
    FAR (insightface's IJB scripts: reversed arrays, argmin), and the mode is in the report and the
    certificate."""
    import json

    from bctkit.cli import main

    q, g = _feats(tiny, 1)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "g.npy", g)
    out = tmp_path / "ev"
    assert main(["evaluate", "--protocol", "ijbc", "--data", str(tiny.root), "--old", str(tmp_path / "g.npy"),
                 "--new", f"new={tmp_path / 'q.npy'}", "--out", str(out), "--quiet",
                 "--tar-mode", "insightface", "--fars", *map(str, FARS), "--fpirs", *map(str, FPIRS),
                 "--topk", *map(str, TOPK)]) == 0
    report = json.loads((out / "report.json").read_text())
    got = {r["metric"]: r for r in report["results"]
           if (r["query_model"], r["gallery_model"]) == ("new", "old")}
    tq, tg = _pool(tiny, q, False), _pool(tiny, g, False)
    fpr, tpr, _ = roc_curve([lab for *_, lab in tiny.pairs], [float(tq[a] @ tg[b]) for a, b, _ in tiny.pairs])
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    for far in FARS:
        rec = got[f"tar@far={far:.0e}".replace("e-0", "e-")]
        assert rec["value"] == pytest.approx(float(tpr[np.argmin(abs(fpr - far))]), abs=1e-9)
        assert "insightface TAR@FAR" in rec["protocol"]
    assert report["test_set"]["tar_mode"] == "insightface"
    cert = json.loads((out / "certificates" / "new__old.json").read_text())
    assert cert["protocol"]["tar_mode"] == "insightface"
