"""LeaveOneOutProtocol against a brute-force leave-one-out (every query's whole row sorted in float64,
its own row dropped), on random and on heavily tied features, with a class of one image; the cross
test never lets a query find its own image; and a whole ``bctkit evaluate --protocol loo`` run from
feature files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bctkit.cli import main
from bctkit.errors import DataError
from bctkit.evaluation.protocols.loo import LeaveOneOutProtocol


def records(result) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in result.records}


def brute_force(q: np.ndarray, g: np.ndarray, labels: np.ndarray, ks) -> tuple[dict[str, float], int]:
    """Leave-one-out by a full stable argsort of each query's float64 scores over the other rows."""
    q = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    g = g.astype(np.float64) / np.linalg.norm(g, axis=1, keepdims=True)
    aps, tops = [], []
    for i in range(len(q)):
        others = np.delete(np.arange(len(g)), i)
        scores = g[others] @ q[i]
        order = others[np.argsort(-scores, kind="stable")]  # equal scores: lower row first
        rel = labels[order] == labels[i]
        if not rel.any():
            continue
        hits = np.flatnonzero(rel)
        aps.append(np.mean((np.arange(hits.size) + 1) / (hits + 1)))
        tops.append([bool(rel[:k].any()) for k in ks])
    out = {f"top{k}": float(np.mean([t[c] for t in tops])) for c, k in enumerate(ks)}
    out["map"] = float(np.mean(aps))
    return out, len(aps)


@pytest.mark.parametrize("block", [1, 7, 4096])
def test_random_cross_against_brute_force(block):
    rng = np.random.default_rng(block)
    n = 90
    labels = rng.integers(0, 12, n)
    labels[5] = 99  # a class with a single image: no relevant item, left out
    centres = rng.normal(size=(100, 6))
    q = (centres[labels] + rng.normal(size=(n, 6))).astype(np.float32)
    g = (centres[labels] + rng.normal(size=(n, 6))).astype(np.float32)
    proto = LeaveOneOutProtocol("rand", labels, ks=(1, 5, 10), block=block)
    res = proto.evaluate_pair(torch.from_numpy(q), torch.from_numpy(g), "all 6 dims")
    want, n_counted = brute_force(q, g, labels, (1, 5, 10))
    got = records(res)
    assert set(got) == {"top1", "top5", "top10", "map"}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12)
    assert n_counted == n - 1 and all(r["n"] == n - 1 for r in res.records)
    assert res.cmc[1] == got["top1"]


def test_exact_ties_rank_the_lower_row_first():
    # +-0.5 in 4 dims: unit vectors whose scores are exact multiples of 0.25, so many are equal
    rng = np.random.default_rng(3)
    x = (rng.integers(0, 2, (80, 4)) - 0.5).astype(np.float32)
    y = (rng.integers(0, 2, (80, 4)) - 0.5).astype(np.float32)
    labels = rng.integers(0, 5, 80)
    proto = LeaveOneOutProtocol("ties", labels, ks=(1, 5), block=9)
    for q, g in ((x, x), (x, y)):
        got = records(proto.evaluate_pair(torch.from_numpy(q), torch.from_numpy(g), "d"))
        want, _ = brute_force(q, g, labels, (1, 5))
        for k, v in want.items():
            assert got[k] == pytest.approx(v, abs=1e-12)


def test_the_query_never_finds_its_own_gallery_row():
    # the gallery model embeds every image exactly as the query model does: with its own row kept,
    # each query would be its own rank-1 match. Class A: rows 0, 1; class B: rows 2, 3.
    # angles: 0 and 0.9 (A), 0.1 and 1.0 (B). Query 0: others by score 2 (B), 1 (A), 3 -> hit at rank 2.
    a = torch.tensor([0.0, 0.9, 0.1, 1.0], dtype=torch.float64)
    feats = torch.stack([torch.cos(a), torch.sin(a)], 1).float()
    proto = LeaveOneOutProtocol("hand", np.array([0, 0, 1, 1]), ks=(1, 2))
    got = records(proto.evaluate_pair(feats, feats, "d"))
    # query 0: [2, 1, 3] -> rank 2; query 1: [3, 2, 0] -> rank 3; query 2: [0, 1, 3] -> rank 3;
    # query 3: [1, 2, 0] -> rank 2
    assert got["top1"] == 0.0 and got["top2"] == 0.5
    assert got["map"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 3 + 1 / 2) / 4)


def test_describe_caveats_and_bad_input():
    labels = np.array([0, 0, 1, 2, 2, 2])
    proto = LeaveOneOutProtocol("toy", labels)
    d = proto.describe()
    assert d["images"] == 6 and d["classes"] == 3 and d["queries_with_match"] == 5
    assert d["singleton_images"] == 1 and d["topk"] == [1, 5]
    assert proto.headline == ("top1", "map")
    assert proto.caveats() == ["1 of 6 images are the only image of their class: with nothing to find they "
                               "are left out of top-k and mAP (each record's n counts the rest)"]
    with pytest.raises(DataError, match="no class has two images"):
        LeaveOneOutProtocol("x", np.array([0, 1, 2]))
    with pytest.raises(DataError, match=r"top-k \[6\]: each k must lie in \[1, 5\]"):
        LeaveOneOutProtocol("x", labels, ks=(6,))
    with pytest.raises(DataError, match="expected 6"):
        proto.evaluate_pair(torch.ones(5, 2), torch.ones(5, 2), "d")


def write_set(tmp: Path, labels: list[int]) -> Path:
    rows = []
    for i, lab in enumerate(labels):
        Image.fromarray(np.full((4, 4, 3), 10 * i, np.uint8)).save(tmp / f"im{i}.png")
        rows.append(f"im{i}.png {lab}")
    (tmp / "set.txt").write_text("\n".join(rows) + "\n")
    return tmp / "set.txt"


def test_from_path_is_the_set_in_file_order(tmp_path):
    proto = LeaveOneOutProtocol.from_path(write_set(tmp_path, [3, 3, 5, 5, 5]), ks=(1, 2))
    assert proto.labels.tolist() == [3, 3, 5, 5, 5] and proto.dataset == proto.source.name
    assert len(proto.source) == 5 and proto.source.key(2) == "im2.png"


def test_cli_from_feature_files_writes_the_criterion(tmp_path):
    rng = np.random.default_rng(0)
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 3]
    data = write_set(tmp_path, labels)
    centres = rng.normal(size=(4, 8))
    old = (centres[labels] + 0.8 * rng.normal(size=(9, 8))).astype(np.float32)
    new = (centres[labels] + 0.5 * rng.normal(size=(9, 8))).astype(np.float32)
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", new)
    out = tmp_path / "ev"
    assert main(["evaluate", "--protocol", "loo", "--data", str(data), "--old", str(tmp_path / "old.npy"),
                 "--new", f"new={tmp_path / 'new.npy'}", "--out", str(out), "--topk", "1", "2",
                 "--block", "4", "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    got = {(r["query_model"], r["gallery_model"], r["metric"]): r["value"] for r in rep["results"]}
    for qn, gn, q, g in (("new", "old", new, old), ("old", "old", old, old), ("new", "new", new, new)):
        want, _ = brute_force(q, g, np.array(labels), (1, 2))
        for k, v in want.items():
            assert got[(qn, gn, k)] == pytest.approx(v, abs=1e-6)
    assert rep["test_set"]["protocol"] == "loo" and rep["test_set"]["singleton_images"] == 1
    cert = json.loads((out / "certificates" / "new__old.json").read_text())
    assert cert["criterion"]["metric"] == "top1"
    assert cert["criterion"]["cross"] == pytest.approx(got[("new", "old", "top1")])
    assert cert["passed"] == (got[("new", "old", "top1")] > got[("old", "old", "top1")])
    md = (out / "report.md").read_text()
    assert "## Compatibility certificates" in md and "only image of their class" in md
