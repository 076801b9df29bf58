"""GLDv2Protocol: mAP@100 against hand counts and the challenge's metric written again (a loop over
each query's top 100 of a full sort), Public / Private / Ignored rows, the release's layout read from
disk, and bad input through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bctkit.cli import main
from bctkit.data.sources.gldv2_retrieval import image_path
from bctkit.errors import DataError
from bctkit.evaluation.protocols.gldv2 import GLDv2Protocol


def records(result) -> dict[str, tuple[float, int]]:
    return {r["metric"]: (r["value"], r["n"]) for r in result.records}


def at_angles(angles) -> torch.Tensor:
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([torch.cos(a), torch.sin(a)], 1).float()


def test_hand_counted_map_at_k():
    # both queries rank the index in row order (row k at angle 0.1 k); k = 3
    feats = at_angles([0.0, 0.0] + [0.1 * k for k in range(6)])
    rel = (np.array([1, 2, 5]), np.array([0]))
    proto = GLDv2Protocol("hand", rel, ("Public", "Private"), 6, k=3)
    got = records(proto.evaluate_pair(feats, feats, "d"))
    # query 0: top 3 = 0, 1, 2 -> hits at 2, 3 -> (1/2 + 2/3) / min(3, 3); row 5 is beyond the cut-off
    public = (1 / 2 + 2 / 3) / 3
    private = 1.0  # query 1: its only relevant image first
    assert got["map@3_public"] == (pytest.approx(public, abs=1e-12), 1)
    assert got["map@3_private"] == (pytest.approx(private, abs=1e-12), 1)
    assert got["map@3"] == (pytest.approx((public + private) / 2, abs=1e-12), 2)
    assert proto.headline == ("map@3", "map@3_private")


def challenge_map(q: np.ndarray, g: np.ndarray, relevant, k: int = 100) -> list[float]:
    """The challenge's AP@k per query, from a stable full sort of float64 cosine scores."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    out = []
    for i, rel in enumerate(relevant):
        prediction = np.argsort(-(g @ q[i]), kind="stable")[:k]
        ap, correct = 0.0, 0
        for rank, item in enumerate(prediction):
            if item in set(rel.tolist()):
                correct += 1
                ap += correct / (rank + 1)
        out.append(ap / min(len(rel), k))
    return out


@pytest.mark.parametrize("block", [1, 16, 1024])
def test_random_against_the_challenge_metric(block):
    rng = np.random.default_rng(block)
    nq, ni, d = 30, 400, 6
    relevant = tuple(rng.choice(ni, rng.integers(1, 150), replace=False) for _ in range(nq))
    usage = tuple(rng.choice(["Public", "Private"], nq).tolist())
    q_model = rng.normal(size=(nq + ni, d)).astype(np.float32)
    g_model = rng.normal(size=(nq + ni, d)).astype(np.float32)
    proto = GLDv2Protocol("rand", relevant, usage, ni, block=block)
    got = records(proto.evaluate_pair(torch.from_numpy(q_model), torch.from_numpy(g_model), "d"))
    aps = np.asarray(challenge_map(q_model[:nq].astype(np.float64), g_model[nq:].astype(np.float64),
                                   relevant))
    use = np.asarray(usage)
    assert got["map@100"] == (pytest.approx(aps.mean(), abs=1e-12), nq)
    for name, value in (("Public", "map@100_public"), ("Private", "map@100_private")):
        assert got[value] == (pytest.approx(aps[use == name].mean(), abs=1e-12), int((use == name).sum()))


INDEX = ["a0f1", "b2e3", "c4d5", "d6c7", "e8b9"]


def write_root(root: Path, solution: str, index_csv: bool = True, queries=("q001", "q002", "q003")) -> Path:
    rng = np.random.default_rng(0)
    for sub, ids in (("test", queries), ("index", INDEX)):
        for image_id in ids:
            path = root / image_path(sub, image_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(path)
    if index_csv:
        (root / "index.csv").write_text("id\n" + "\n".join(reversed(INDEX)) + "\n")
    (root / "retrieval_solution_v2.1.csv").write_text(solution)
    return root


SOLUTION = ('id,images,Usage\n'
            'q001,"b2e3 e8b9",Public\n'
            'q009,None,Ignored\n'
            'q002,c4d5,Private\n'
            'q003,"a0f1 b2e3 c4d5",Private\n')


def test_layout_rows_and_cli_from_feature_files(tmp_path):
    root = write_root(tmp_path / "gld", SOLUTION)
    proto = GLDv2Protocol.from_root(root)
    src = proto.source
    # queries in solution order (the Ignored row neither embedded nor counted), then index.csv's order
    assert [src.key(i) for i in range(len(src))] == [
        "test/q/0/0/q001.jpg", "test/q/0/0/q002.jpg", "test/q/0/0/q003.jpg", "index/e/8/b/e8b9.jpg",
        "index/d/6/c/d6c7.jpg", "index/c/4/d/c4d5.jpg", "index/b/2/e/b2e3.jpg", "index/a/0/f/a0f1.jpg"]
    assert [r.tolist() for r in proto.relevant] == [[3, 0], [2], [4, 3, 2]]
    assert proto.usage == ("Public", "Private", "Private")
    assert proto.describe()["public_queries"] == 1 and proto.describe()["index_images"] == 5
    scanned = GLDv2Protocol.from_root(write_root(tmp_path / "scan", SOLUTION, index_csv=False))
    assert scanned.source.key(3) == "index/a/0/f/a0f1.jpg"  # no index.csv: ids sorted
    rng = np.random.default_rng(2)
    old, new = (rng.normal(size=(8, 4)).astype(np.float32) for _ in range(2))
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", new)
    out = tmp_path / "ev"
    assert main(["evaluate", "--protocol", "gldv2", "--data", str(root), "--old", str(tmp_path / "old.npy"),
                 "--new", f"new={tmp_path / 'new.npy'}", "--out", str(out), "--block", "2", "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    got = {r["metric"]: r["value"] for r in rep["results"]
           if r["query_model"] == "new" and r["gallery_model"] == "old"}
    aps = challenge_map(new[:3].astype(np.float64), old[3:].astype(np.float64), proto.relevant)
    assert got["map@100"] == pytest.approx(np.mean(aps), abs=1e-6)
    assert got["map@100_public"] == pytest.approx(aps[0], abs=1e-6)
    assert got["map@100_private"] == pytest.approx(np.mean(aps[1:]), abs=1e-6)
    cert = json.loads((out / "certificates" / "new__old.json").read_text())
    assert cert["criterion"]["metric"] == "map@100"


def cli_error(capsys, root: Path, tmp_path: Path) -> str:
    code = main(["evaluate", "--protocol", "gldv2", "--data", str(root), "--old", "x.npy", "--new", "y.npy",
                 "--out", str(tmp_path / "ev"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    return err


@pytest.mark.parametrize("solution, message", [
    ('id,images,Usage\nq001,"b2e3 ffff",Public\n',
     "retrieval_solution_v2.1.csv:2: id ffff is not in the index"),
    ('id,images,Usage\nq001,b2e3,Public\nq002,"c4d5",Private,extra\n',
     "retrieval_solution_v2.1.csv:3: expected 3 fields (id, images, Usage), got 4"),
    ('id,images,Usage\nq001,b2e3,Secret\n', "retrieval_solution_v2.1.csv:2: Usage 'Secret'"),
    ('id,images,Usage\nq001,None,Public\n', "retrieval_solution_v2.1.csv:2: a Public query with no relevant"),
    ('id,images,Usage\nq001,"b2e3 b2e3",Public\n', ":2: an index id is listed twice for test image q001"),
    ('id,images,Usage\nq001,b2e3,Public\nq001,c4d5,Private\n', ":3: test image q001 has a second row"),
    ('id,imgs,Usage\nq001,b2e3,Public\n',
     "retrieval_solution_v2.1.csv:1: expected the header 'id,images,Usage'"),
    ('id,images,Usage\nq404,b2e3,Public\n', "retrieval_solution_v2.1.csv:2: query q404: image "),
])
def test_bad_input_is_one_line_through_the_cli(tmp_path, capsys, solution, message):
    root = write_root(tmp_path / "gld", solution)
    assert message in cli_error(capsys, root, tmp_path)


def test_protocol_checks_its_arguments():
    with pytest.raises(DataError, match="query 0: relevant rows must be distinct"):
        GLDv2Protocol("x", (np.array([0, 0]),), ("Public",), 3)
    with pytest.raises(DataError, match="usage 'Ignored'"):
        GLDv2Protocol("x", (np.array([0]),), ("Ignored",), 3)
