"""ReIDProtocol: the standard Market-1501 junk rules on a hand-built case with known answers, and
every number against a plain re-implementation of the standard per-query loop."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bctkit.errors import DataError
from bctkit.evaluation.protocols.reid import ReIDProtocol
from bctkit.evaluation.protocols.retrieval import RankingOptions


def at_angles(angles: list[float]) -> torch.Tensor:
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([torch.cos(a), torch.sin(a)], 1).float()


def records(result) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in result.records}


def hand_protocol(ap: str = "mean") -> tuple[ReIDProtocol, torch.Tensor]:
    # query 0: person 1, camera 1, at angle 0; query 1: person 7, seen only by its own camera.
    # gallery by decreasing score: same id+cam (junk), two id -1 (junk), a relevant one,
    # a 0000 distractor, a second relevant one, person 7 at camera 1 (junk for query 1)
    q_pids, q_cams = [1, 7], [1, 1]
    g_pids, g_cams = [1, -1, -1, 1, 0, 1, 7], [1, 2, 3, 2, 2, 3, 1]
    feats = torch.cat([at_angles([0.0, 0.0]), at_angles([0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5])])
    proto = ReIDProtocol("hand", np.array(q_pids + g_pids), np.array(q_cams + g_cams), 2,
                         options=RankingOptions(ks=(1, 2, 5)), ap=ap)
    return proto, feats


def test_hand_built_junk_rules():
    proto, feats = hand_protocol()
    res = proto.evaluate_pair(feats, feats, "all 2 dims")
    got = records(res)
    # standard: ranking after junk removal = relevant, 0000, relevant -> hits at ranks 1 and 3
    assert got["map"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert got["top1"] == 1.0 and got["top2"] == 1.0 and got["top5"] == 1.0
    assert all(r["n"] == 1 for r in res.records)  # query 1 has no relevant image: left out
    assert "map@r" not in got
    # (had -1 been kept and 0000 removed: hits at ranks 3 and 4, mAP 0.4167, top1 0)
    trap = ReIDProtocol("hand", proto.pids, proto.cams, 2, options=proto.options, ap="trapezoid")
    assert records(trap.evaluate_pair(feats, feats, "d"))["map"] == pytest.approx(
        ((1 + 1) / 2 + (2 / 3 + 1 / 2) / 2) / 2)


def standard_loop(q, g, q_pids, q_cams, g_pids, g_cams, ks):
    """The standard evaluation written per query with numpy (distance = 1 - cosine)."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    aps, cmc = [], []
    for i in range(len(q)):
        dist = 1.0 - (gn @ qn[i]).astype(np.float32)
        order = np.argsort(dist, kind="stable")
        junk = ((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i])) | (g_pids[order] == -1)
        matches = (g_pids[order] == q_pids[i])[~junk]
        if not matches.any():
            continue
        positions = np.flatnonzero(matches) + 1
        aps.append(np.mean(np.arange(1, len(positions) + 1) / positions))
        cmc.append([positions[0] <= k for k in ks])
    return float(np.mean(aps)), dict(zip(ks, np.mean(cmc, 0).tolist(), strict=True)), len(aps)


@pytest.mark.parametrize("block", [1, 16, 4096])
def test_random_against_standard_loop(block):
    rng = np.random.default_rng(block)
    nq, ng, d = 60, 400, 8
    q_pids = rng.integers(1, 30, nq)
    g_pids = rng.integers(-1, 35, ng)  # includes -1 junk and 0 distractors
    q_cams, g_cams = rng.integers(1, 4, nq), rng.integers(1, 4, ng)
    # the gallery model and the query model differ: the query model's gallery rows are never used
    q_model = torch.from_numpy(rng.normal(size=(nq + ng, d)).astype(np.float32))
    g_model = torch.from_numpy(rng.normal(size=(nq + ng, d)).astype(np.float32))
    proto = ReIDProtocol("rand", np.concatenate([q_pids, g_pids]), np.concatenate([q_cams, g_cams]), nq,
                         options=RankingOptions(ks=(1, 5, 10), block=block))
    res = proto.evaluate_pair(q_model, g_model, "all")
    got = records(res)
    mean_ap, cmc, n = standard_loop(q_model[:nq].numpy(), g_model[nq:].numpy(), q_pids, q_cams, g_pids,
                                    g_cams, (1, 5, 10))
    assert got["map"] == pytest.approx(mean_ap, abs=1e-12)
    for k in (1, 5, 10):
        assert got[f"top{k}"] == pytest.approx(cmc[k], abs=1e-12)
    assert res.records[0]["n"] == n
    garbage = q_model.clone()
    garbage[nq:] = torch.randn(ng, d)
    g2 = g_model.clone()
    g2[:nq] = torch.randn(nq, d)
    assert records(proto.evaluate_pair(garbage, g2, "all")) == got


def test_index_option_reports_recall():
    proto, feats = hand_protocol()
    opts = RankingOptions(ks=(1, 2), index="Flat")
    indexed = ReIDProtocol("hand", proto.pids, proto.cams, 2, options=opts)
    got = records(indexed.evaluate_pair(feats, feats, "d"))
    assert got["top1"] == 1.0 and got["index_recall@1"] == 1.0 and got["index_recall@2"] == 1.0


def jpg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 4, 3), value, np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def test_from_root_source_order_and_describe(tmp_path: Path):
    for sub, names in (("query", ["0001_c1s1_000001_00.png", "0002_c2s1_000001_00.png"]),
                       ("bounding_box_test", ["-1_c1s1_000005_01.png", "0000_c1s1_000006_01.png",
                                              "0001_c2s1_000007_01.png", "0002_c1s1_000008_01.png"])):
        (tmp_path / sub).mkdir()
        for k, name in enumerate(names):
            (tmp_path / sub / name).write_bytes(jpg(10 * k))
    proto = ReIDProtocol.from_root(tmp_path, options=RankingOptions(ks=(1,)))
    assert proto.n_query == 2 and len(proto.source) == 6
    assert proto.source.key(0) == "query/0001_c1s1_000001_00.png"
    assert proto.source.key(2) == "bounding_box_test/-1_c1s1_000005_01.png"
    assert proto.pids.tolist() == [1, 2, -1, 0, 1, 2] and proto.cams.tolist() == [1, 2, 1, 1, 2, 1]
    desc = proto.describe()
    assert desc["protocol"] == "market" and desc["gallery_junk"] == 1 and desc["gallery_distractors"] == 1
    feats = torch.eye(6)[:, :6] + 0.01
    assert not math.isnan(records(proto.evaluate_pair(feats, feats, "d"))["map"])


def test_errors():
    proto, feats = hand_protocol()
    with pytest.raises(DataError, match="expected 9"):
        proto.evaluate_pair(feats[:5], feats[:5], "d")
    too_deep = ReIDProtocol("h", proto.pids, proto.cams, 2, options=RankingOptions(ks=(6,)))
    with pytest.raises(DataError, match="top-k 6 exceeds the gallery of 5 images"):  # 7 less 2 id -1
        too_deep.evaluate_pair(feats, feats, "d")
    with pytest.raises(DataError, match="ap 'x'"):
        ReIDProtocol("h", proto.pids, proto.cams, 2, ap="x")


def test_headline_is_map_then_top1():
    proto, _ = hand_protocol()
    assert proto.headline == ("map", "top1")
