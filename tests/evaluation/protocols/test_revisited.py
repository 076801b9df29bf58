"""RevisitedProtocol: hand-counted Easy / Medium / Hard mAP and mP@k (junk ranked above positives,
a query without hard positives, a distractor), a randomized comparison with a plain re-implementation
of the authors' compute_map over the full score matrix, the data layout read from disk (query crops,
distractors) and bad input through the CLI."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bctkit.cli import main
from bctkit.data.sources.revisited import crop_box, distractor_source
from bctkit.errors import DataError
from bctkit.evaluation.protocols.revisited import RevisitedProtocol

KS = (1, 5, 10)


def at_angles(angles) -> torch.Tensor:
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([torch.cos(a), torch.sin(a)], 1).float()


def records(result) -> dict[str, tuple[float, int]]:
    return {r["metric"]: (r["value"], r["n"]) for r in result.records}


def arrays(*lists):
    return tuple(np.asarray(x, np.int64) for x in lists)


# Query 0 ranks the database in row order (database row k at angle 0.1 k): 0 junk, 1 easy, 2 negative,
# 3 hard, 4 easy, 5 junk, 6 negative, 7 hard, 8 negative. Query 1 (same features) lists only row 8, easy.
EASY, HARD, JUNK = arrays([1, 4], [8]), arrays([3, 7], []), arrays([0, 5], [])


def hand_protocol(n_distractors: int = 0) -> RevisitedProtocol:
    return RevisitedProtocol("hand", EASY, HARD, JUNK, 9, n_distractors)


def test_hand_counted_setups():
    feats = at_angles([0.0, 0.0] + [0.1 * k for k in range(9)])
    got = records(hand_protocol().evaluate_pair(feats, feats, "all 2 dims"))
    # Easy (junk: 0, 5, 3, 7): query 0 keeps 1, 2, 4, 6, 8 -> positives at r = 0, 2
    easy0 = ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2
    # query 1: nothing is junk, row 8 at r = 8 -> ((0 / 8) + 1 / 9) / 2
    q1 = (0 + 1 / 9) / 2
    # Medium (junk: 0, 5): query 0 keeps 1, 2, 3, 4, 6, 7, 8 -> positives at r = 0, 2, 3, 5
    medium0 = (1 + (1 / 2 + 2 / 3) / 2 + (2 / 3 + 3 / 4) / 2 + (3 / 5 + 4 / 6) / 2) / 4
    # Hard (junk: 0, 5, 1, 4): query 0 keeps 2, 3, 6, 7, 8 -> positives at r = 1, 3; query 1 has none
    hard0 = ((0 / 1 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2
    assert easy0 == pytest.approx(19 / 24) and medium0 == pytest.approx(351 / 480)
    assert hard0 == pytest.approx(1 / 3)
    assert got["map_easy"][0] == pytest.approx((easy0 + q1) / 2, abs=1e-12)
    assert got["map_medium"][0] == pytest.approx((medium0 + q1) / 2, abs=1e-12)
    assert got["map_hard"] == (pytest.approx(hard0, abs=1e-12), 1)
    assert got["map_easy"][1] == 2 and got["map_medium"][1] == 2
    # mP@k: kq = min(last positive's 1-based rank, k); query 1's only positive is 9th
    assert got["mp@1_easy"][0] == pytest.approx((1 + 0) / 2)
    assert got["mp@5_easy"][0] == pytest.approx((2 / 3 + 0) / 2)
    assert got["mp@10_easy"][0] == pytest.approx((2 / 3 + 1 / 9) / 2)
    assert got["mp@5_medium"][0] == pytest.approx((3 / 5 + 0) / 2)
    assert got["mp@10_medium"][0] == pytest.approx((4 / 6 + 1 / 9) / 2)
    assert got["mp@1_hard"][0] == 0.0 and got["mp@5_hard"][0] == pytest.approx(2 / 4)


def test_a_distractor_is_a_negative_for_every_query():
    # one distractor at angle 0.25, between database rows 2 and 3
    feats = at_angles([0.0, 0.0] + [0.1 * k for k in range(9)] + [0.25])
    got = records(hand_protocol(1).evaluate_pair(feats, feats, "d"))
    # Hard, query 0 keeps 2, D, 3, 6, 7, 8 -> positives at r = 2, 4
    hard0 = ((0 + 1 / 3) / 2 + (1 / 4 + 2 / 5) / 2) / 2
    assert got["map_hard"][0] == pytest.approx(hard0, abs=1e-12)
    # Easy, query 0 keeps 1, 2, D, 4, 6, 8 -> positives at r = 0, 3; query 1: row 8 at r = 9
    easy0 = ((1 + 1) / 2 + (1 / 3 + 2 / 4) / 2) / 2
    assert got["map_easy"][0] == pytest.approx((easy0 + (0 + 1 / 10) / 2) / 2, abs=1e-12)


def authors_compute_map(ranks: np.ndarray, gnd: list[dict], kappas=KS):
    """The authors' evaluation written again: ``ranks`` [n_db, nq], positions by membership (their
    np.in1d), positives' positions lowered by the junk before them, trapezoid AP, mP@k; queries
    without positives skipped."""
    aps, prs = [], []
    for i, g in enumerate(gnd):
        qgnd, qgndj = np.array(g["ok"]), np.array(g["junk"])
        if qgnd.shape[0] == 0:
            continue
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = ij = 0
        if len(junk):
            for ip in range(len(pos)):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
        ap = 0.0
        for j, rank in enumerate(pos):
            p0 = 1.0 if rank == 0 else j / rank
            ap += (p0 + (j + 1) / (rank + 1)) / 2 / len(qgnd)
        aps.append(ap)
        pos = pos + 1
        prs.append([(pos <= min(pos.max(), kq)).sum() / min(pos.max(), kq) for kq in kappas])
    return float(np.mean(aps)), np.mean(prs, 0), len(aps)


@pytest.mark.parametrize("seed, repeats", [(0, False), (1, False), (2, True)])
def test_random_against_the_authors_compute_map(seed, repeats):
    rng = np.random.default_rng(seed)
    nq, ndb, nd, d = 9, 120, 60, 5
    easy, hard, junk = [], [], []
    for _ in range(nq):
        perm = rng.permutation(ndb)
        a, b, c = (int(x) for x in rng.integers(0, 12, 3))
        easy.append(perm[:a])
        hard.append(perm[a : a + b])
        junk.append(perm[a + b : a + b + c])
        if repeats:  # an index in two lists, and one listed twice: counted as the authors' code does
            junk[-1] = np.concatenate([junk[-1], perm[:1]])
            hard[-1] = np.concatenate([hard[-1], perm[a : a + 1]])
    q_model = rng.normal(size=(nq + ndb + nd, d)).astype(np.float32)
    g_model = rng.normal(size=(nq + ndb + nd, d)).astype(np.float32)
    proto = RevisitedProtocol("rand", tuple(easy), tuple(hard), tuple(junk), ndb, nd, block=4)
    got = records(proto.evaluate_pair(torch.from_numpy(q_model), torch.from_numpy(g_model), "d"))
    q = q_model[:nq].astype(np.float64)
    g = g_model[nq:].astype(np.float64)
    scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    ranks = np.argsort(-scores, axis=1, kind="stable").T
    lists = list(zip(easy, hard, junk, strict=True))
    setups = {"easy": [{"ok": e, "junk": np.concatenate([j, h])} for e, h, j in lists],
              "medium": [{"ok": np.concatenate([e, h]), "junk": j} for e, h, j in lists],
              "hard": [{"ok": h, "junk": np.concatenate([j, e])} for e, h, j in lists]}
    for setup, gnd in setups.items():
        mean_ap, mp, n = authors_compute_map(ranks, gnd)
        assert got[f"map_{setup}"] == (pytest.approx(mean_ap, abs=1e-12), n)
        for c, k in enumerate(KS):
            assert got[f"mp@{k}_{setup}"][0] == pytest.approx(mp[c], abs=1e-12)
    assert (proto.overlaps > 0) == repeats and bool(proto.caveats()) == repeats


def test_crop_rounds_as_pil_and_refuses_boxes_outside():
    assert crop_box(np.array([0.5, 1.5, 2.5, 3.5]), (4, 4), "q") == (0, 2, 2, 4)  # half to even
    assert crop_box(np.array([1.49, 0.51, 3.6, 2.0]), (4, 4), "q") == (1, 1, 4, 2)
    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    assert np.array_equal(np.asarray(img.crop((0.5, 1.5, 2.5, 3.5))), np.asarray(img)[2:4, 0:2])
    with pytest.raises(DataError, match=r"q: box \[0.0, 0.0, 5.0, 2.0\] \(rounded \[0, 0, 5, 2\]\) is empty "
                                        r"or outside the 4x4 image"):
        crop_box(np.array([0.0, 0.0, 5.0, 2.0]), (4, 4), "q")
    with pytest.raises(DataError, match="empty"):
        crop_box(np.array([2.0, 0.0, 2.4, 2.0]), (4, 4), "q")


def write_root(root: Path, bbx=(1.0, 2.0, 5.0, 6.0), gnd_obj=None) -> Path:
    """A miniature in the release's layout: 2 queries (q0, q1), 3 database images (d0..d2)."""
    (root / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, name in enumerate(["q0", "q1", "d0", "d1", "d2"]):
        pixels = rng.integers(0, 256, (8 + k, 10 + k, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "jpg" / f"{name}.jpg", quality=95)
    gnd = gnd_obj if gnd_obj is not None else {
        "imlist": ["d0", "d1", "d2"], "qimlist": ["q0", "q1"],
        "gnd": [{"bbx": list(bbx), "easy": [0], "hard": [1], "junk": []},
                {"bbx": [0, 0, 4, 4], "easy": [], "hard": [2], "junk": [0]}]}
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gnd, protocol=2))  # empty numpy arrays: bytes()
    return root


def test_from_root_rows_crops_keys_and_distractors(tmp_path):
    root = write_root(tmp_path / "rox", bbx=(1.5, 2.0, 5.5, 6.0))
    dis = tmp_path / "r1m"
    (dis / "jpg" / "a").mkdir(parents=True)
    for name in ("a/x.jpg", "b.jpg"):
        Image.new("RGB", (3, 3), (9, 9, 9)).save(dis / "jpg" / name)
    (dis / "list.txt").write_text("b.jpg\na/x.jpg\n")
    proto = RevisitedProtocol.from_root(root, "roxford5k", distractors=dis / "list.txt")
    src = proto.source
    assert proto.n_query == 2 and proto.n_database == 3 and proto.n_distractors == 2 and len(src) == 7
    assert [src.key(i) for i in range(7)] == ["query/q0", "query/q1", "jpg/d0.jpg", "jpg/d1.jpg",
                                              "jpg/d2.jpg", "distractors/b.jpg", "distractors/a/x.jpg"]
    full = np.asarray(Image.open(root / "jpg" / "q0.jpg").convert("RGB"))
    assert np.array_equal(src.decode(0), full[2:6, 2:6].transpose(2, 0, 1))  # x: round(1.5)=2 .. round(5.5)=6
    assert src.decode(2).shape == (3, 10, 12) and src.decode(6).shape == (3, 3, 3)
    assert "cropped to [2, 2, 6, 6]" in src.describe(0)
    folder = distractor_source(dis / "jpg")
    assert [folder.key(i) for i in range(2)] == ["a/x.jpg", "b.jpg"]
    desc = proto.describe()
    assert desc["distractors"] == 2 and desc["easy"] == 1 and desc["hard"] == 2 and desc["junk"] == 1


def test_cli_with_feature_files_and_distractors(tmp_path):
    root = write_root(tmp_path / "rox")
    dis = tmp_path / "dis"
    dis.mkdir()
    for name in ("e.png", "f.png"):
        Image.new("RGB", (3, 3)).save(dis / name)
    rng = np.random.default_rng(1)
    old, new = (rng.normal(size=(7, 6)).astype(np.float32) for _ in range(2))
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", new)
    out = tmp_path / "ev"
    assert main(["evaluate", "--protocol", "roxford", "--data", str(root), str(dis), "--old",
                 str(tmp_path / "old.npy"), "--new", f"new={tmp_path / 'new.npy'}", "--out", str(out),
                 "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    got = {r["metric"]: r["value"] for r in rep["results"]
           if r["query_model"] == "new" and r["gallery_model"] == "old"}
    proto = RevisitedProtocol.from_root(root, distractors=dis)
    want = records(proto.evaluate_pair(torch.from_numpy(new), torch.from_numpy(old), "d"))
    assert got == {k: v for k, (v, _) in want.items()}
    cert = json.loads((out / "certificates" / "new__old.json").read_text())
    assert cert["criterion"]["metric"] == "map_medium"
    assert "### Retrieval" in (out / "report.md").read_text()


def cli_error(capsys, *args: str) -> str:
    code = main(["evaluate", *args, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    return err


class _Shell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cli_refuses_a_gnd_naming_a_global_without_running_it(tmp_path, capsys):
    marker = tmp_path / "ran"
    root = write_root(tmp_path / "rox", gnd_obj={"imlist": ["d0"], "qimlist": [], "gnd": [_Shell(marker)]})
    np.save(tmp_path / "f.npy", np.ones((3, 2), np.float32))
    err = cli_error(capsys, "--protocol", "roxford", "--data", str(root), "--old", str(tmp_path / "f.npy"),
                    "--new", str(tmp_path / "f.npy"), "--out", str(tmp_path / "ev"))
    assert "gnd_roxford5k.pkl: refused, the pickle names" in err and "system" in err
    assert not marker.exists()


def test_cli_refuses_a_query_box_outside_its_image(tmp_path, capsys):
    root = write_root(tmp_path / "rox", bbx=(1.0, 2.0, 30.0, 6.0))  # q0 is 10 x 8
    np.save(tmp_path / "f.npy", np.ones((5, 2), np.float32))
    err = cli_error(capsys, "--protocol", "roxford", "--data", str(root), "--old", str(tmp_path / "f.npy"),
                    "--new", str(tmp_path / "f.npy"), "--out", str(tmp_path / "ev"))
    assert "gnd_roxford5k.pkl: query 0 (q0, " in err and "q0.jpg): box [1.0, 2.0, 30.0, 6.0]" in err
    assert "outside the 10x8 image" in err


@pytest.mark.parametrize("entry, message", [
    ({"bbx": [0, 0, 1, 1], "easy": [7], "hard": [], "junk": []},
     "gnd[0].easy: index 7 is outside the database"),
    ({"bbx": [0, 0, 1], "easy": [], "hard": [], "junk": []}, "gnd[0].bbx: expected [x1, y1, x2, y2]"),
    ({"bbx": [0, 0, 1, 1], "easy": [], "hard": ["a"], "junk": []},
     "gnd[0].hard: expected a list of database"),
    ({"bbx": [0, 0, 1, 1], "easy": [], "hard": []}, "gnd[0]: no 'junk' list"),
])
def test_cli_names_the_bad_field(tmp_path, capsys, entry, message):
    gnd = {"imlist": ["d0", "d1", "d2"], "qimlist": ["q0"], "gnd": [entry]}
    root = write_root(tmp_path / "rox", gnd_obj=gnd)
    err = cli_error(capsys, "--protocol", "roxford", "--data", str(root), "--old", "x.npy", "--new", "y.npy",
                    "--out", str(tmp_path / "ev"))
    assert message in err


def test_gnd_with_numpy_arrays_is_read(tmp_path):
    gnd = {"imlist": ["d0", "d1", "d2"], "qimlist": ["q0"],
           "gnd": [{"bbx": np.array([0.0, 0.0, 4.0, 4.0]), "easy": np.array([0, 2]),
                    "hard": np.array([], np.int64), "junk": np.array([1])}]}
    root = write_root(tmp_path / "rox", gnd_obj=gnd)
    proto = RevisitedProtocol.from_root(root)
    assert [x.tolist() for x in proto.lists[0]] == [[0, 2], [], [1]]
