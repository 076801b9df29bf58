"""QueryGalleryProtocol: list files and image folders, identities matched by name across the two
lists, distractors kept, every number against a plain per-query loop."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bctkit.errors import DataError
from bctkit.evaluation.protocols.retrieval import QueryGalleryProtocol, RankingOptions


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((5, 5), value, np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def write_list(folder: Path, name: str, labels: list[int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, label in enumerate(labels):
        (folder / f"{name}_{k}.png").write_bytes(png(k))
        lines.append(f"{name}_{k}.png {label}")
    (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return folder / f"{name}.txt"


def loop_metrics(q, qid, g, gid, ks):
    """mAP, mAP@R and CMC over queries with a gallery match, one query at a time."""
    aps, aprs, firsts = [], [], []
    for i in range(len(q)):
        s = [float(np.dot(q[i], g[j]) / np.linalg.norm(q[i]) / np.linalg.norm(g[j])) for j in range(len(g))]
        s = np.asarray(s, np.float32)
        order = sorted(range(len(g)), key=lambda j: (-s[j], j))
        rel = [gid[j] == qid[i] for j in order]
        r = sum(rel)
        if r == 0:
            continue
        hits, ap, apr = 0, 0.0, 0.0
        for pos, is_rel in enumerate(rel, 1):
            if is_rel:
                hits += 1
                ap += hits / pos
                apr += hits / pos if pos <= r else 0.0
        aps.append(ap / r)
        aprs.append(apr / r)
        firsts.append(rel.index(True) + 1)
    return np.mean(aps), np.mean(aprs), {k: np.mean([f <= k for f in firsts]) for k in ks}, len(aps)


def test_lists_match_identities_by_name_and_keep_distractors(tmp_path):
    # the query list names identities 3, 8, 4; the gallery 8, 3, 5, 9 (5, 9: distractors; 4: unmatched)
    qfile = write_list(tmp_path / "q", "query", [3, 8, 4, 3])
    gfile = write_list(tmp_path / "g", "gallery", [8, 8, 3, 5, 9, 3, 9])
    proto = QueryGalleryProtocol.from_lists(qfile, gfile, options=RankingOptions(ks=(1, 2)))
    src = proto.source
    assert len(src) == 11 and proto.n_query == 4
    assert src.key(0) == "query_0.png" and src.key(4) == "gallery_0.png"
    names = [src.label_name(int(v)) for v in src.labels]
    assert names == ["3", "8", "4", "3", "8", "8", "3", "5", "9", "3", "9"]
    assert proto.labels[0] == proto.labels[6] and proto.labels[1] == proto.labels[4]
    desc = proto.describe()
    assert (desc["queries_with_match"], desc["distractor_identities"], desc["gallery_images"]) == (3, 2, 7)
    rng = np.random.default_rng(0)
    q_model = torch.from_numpy(rng.normal(size=(11, 5)).astype(np.float32))
    g_model = torch.from_numpy(rng.normal(size=(11, 5)).astype(np.float32))
    res = proto.evaluate_pair(q_model, g_model, "all 5 dims")
    got = {r["metric"]: r["value"] for r in res.records}
    qid = [3, 8, 4, 3]
    gid = [8, 8, 3, 5, 9, 3, 9]
    m, mr, cmc, n = loop_metrics(q_model[:4].numpy(), qid, g_model[4:].numpy(), gid, (1, 2))
    assert n == 3 and all(r["n"] == 3 for r in res.records)
    assert got["map"] == pytest.approx(m, abs=1e-12) and got["map@r"] == pytest.approx(mr, abs=1e-12)
    assert got["top1"] == pytest.approx(cmc[1]) and got["top2"] == pytest.approx(cmc[2])
    assert set(res.cmc) >= {1, 2, 3, 5}


def test_random_sets_against_loop():
    rng = np.random.default_rng(4)
    nq, ng = 50, 300
    qid, gid = rng.integers(0, 40, nq), rng.integers(0, 60, ng)
    feats = torch.from_numpy(rng.normal(size=(nq + ng, 6)).astype(np.float32))
    proto = QueryGalleryProtocol("rand", np.concatenate([qid, gid]), nq, options=RankingOptions(block=7))
    got = {r["metric"]: r["value"] for r in proto.evaluate_pair(feats, feats, "d").records}
    m, mr, cmc, _ = loop_metrics(feats[:nq].numpy(), qid, feats[nq:].numpy(), gid, (1, 5, 10))
    assert got["map"] == pytest.approx(m, abs=1e-12) and got["map@r"] == pytest.approx(mr, abs=1e-12)
    for k in (1, 5, 10):
        assert got[f"top{k}"] == pytest.approx(cmc[k], abs=1e-12)


def test_folders_match_by_folder_name(tmp_path):
    for root, ids in (("queries", ["bob", "cy"]), ("gallery", ["ann", "bob", "cy"])):
        for k, ident in enumerate(ids):
            (tmp_path / root / ident).mkdir(parents=True)
            (tmp_path / root / ident / "a.png").write_bytes(png(k))
    proto = QueryGalleryProtocol.from_folders(tmp_path / "queries", tmp_path / "gallery",
                                              options=RankingOptions(ks=(1,)))
    names = [proto.source.label_name(int(v)) for v in proto.labels]
    assert names == ["bob", "cy", "ann", "bob", "cy"]
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.9, 0.1], [0.2, 0.9]])
    got = {r["metric"]: r["value"] for r in proto.evaluate_pair(feats, feats, "d").records}
    assert got["top1"] == 1.0 and got["map"] == 1.0


def test_errors():
    with pytest.raises(DataError, match="at least one query and one gallery"):
        QueryGalleryProtocol("x", np.array([0, 1]), 2)
    proto = QueryGalleryProtocol("x", np.array([0, 0, 1]), 1, options=RankingOptions(ks=(3,)))
    with pytest.raises(DataError, match="top-k 3 exceeds the gallery of 2"):
        proto.evaluate_pair(torch.ones(3, 2), torch.ones(3, 2), "d")
    with pytest.raises(DataError, match="expected 3"):
        proto.evaluate_pair(torch.ones(2, 2), torch.ones(2, 2), "d")
