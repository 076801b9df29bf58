"""``bctkit evaluate --protocol pairs | retrieval`` end to end: models are run over the test set's
images (checked against a hand-written forward of the same pixels), feature files are matched by
key, the cross test puts the query model on the first image / query side, extracted features are
reused, and bad input is one line with exit 2."""

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bctkit.cli import main
from bctkit.models.config import BackboneConfig
from bctkit.models.factory import build_backbone
from bctkit.models.heads import HeadConfig
from bctkit.models.store import save_model

SIZE, DIM = 16, 8


def tiny_model(path: Path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = BackboneConfig(arch="r8", width=4, embedding_dim=DIM, image_size=SIZE, in_channels=3)
    net = build_backbone(cfg)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                m.running_var.fill_(4.0)
    meta = {"name": path.parent.name, "preprocessing": {
        "color": "rgb", "resize": None, "crop": None, "mean": [0.5] * 3, "std": [0.5] * 3,
        "input": [3, SIZE, SIZE]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, net, None, HeadConfig(), meta)
    return net.eval()


def by_hand(net: torch.nn.Module, images: list[np.ndarray]) -> np.ndarray:
    """The model's features of HWC uint8 images: (x / 255 - 0.5) / 0.5, NCHW, forward."""
    x = torch.from_numpy(np.stack(images).astype(np.float32)).permute(0, 3, 1, 2) / 255.0
    with torch.no_grad():
        return net((x - 0.5) / 0.5).numpy().astype(np.float64)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def auc(scores: np.ndarray, genuine: np.ndarray) -> float:
    """Mann-Whitney: the share of (genuine, impostor) pairs ranked right, ties counting half."""
    g, i = scores[genuine], scores[~genuine]
    right = (g[:, None] > i[None, :]).sum() + 0.5 * (g[:, None] == i[None, :]).sum()
    return float(right / (len(g) * len(i)))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("testset")
    rng = np.random.default_rng(0)
    nets = {name: tiny_model(root / name / "model.safetensors", seed) for seed, name in
            enumerate(["old", "new"])}
    pairs = 30
    images = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2 * pairs)]
    issame = [bool(b) for b in rng.integers(0, 2, pairs)]
    (root / "toy.bin").write_bytes(pickle.dumps(([png(a) for a in images], issame), protocol=4))
    return root, nets, images, np.array(issame)


def run(*args: str) -> int:
    return main(["evaluate", *args, "--quiet"])


def records(out: Path, query: str, gallery: str) -> dict[str, float]:
    rep = json.loads((out / "report.json").read_text())
    return {r["metric"]: r["value"] for r in rep["results"]
            if r["query_model"] == query and r["gallery_model"] == gallery}


def test_pairs_with_models_equal_a_hand_computation(world):
    root, nets, images, issame = world
    out = root / "ev-pairs"
    assert run("--protocol", "pairs", "--data", str(root / "toy.bin"), "--old", str(root / "old"),
               "--new", str(root / "new" / "model.safetensors"), "--out", str(out), "--fars", "0.1") == 0
    feats = {n: by_hand(net, images) for n, net in nets.items()}
    for q, g in [("new", "old"), ("old", "old"), ("new", "new"), ("old", "new")]:
        scores = cosine_rows(feats[q][0::2], feats[g][1::2])  # first image by the query model
        assert records(out, q, g)["auc"] == pytest.approx(auc(scores, issame), abs=1e-12)
    stored = json.loads((out / "report.json").read_text())
    assert stored["test_set"]["pairs"] == 30
    cert = json.loads((out / "certificates" / "new__old.json").read_text())
    assert cert["criterion"]["metric"] == "acc10fold"  # the pair set's headline metric
    assert cert["criterion"]["cross"] == records(out, "new", "old")["acc10fold"]
    assert "acc10fold" in stored["matrices"]
    md = (out / "report.md").read_text()  # every record shows in report.md: the headline with its mark
    verification = md.split("### 1:1 verification", 1)[1].split("###", 1)[0]
    new_row = next(ln for ln in verification.splitlines() if ln.startswith("| new |"))
    assert verification.splitlines()[2].startswith("| model | acc10fold self | acc10fold cross |")
    assert f"{100 * records(out, 'new', 'old')['acc10fold']:.2f} ✗" in new_row or \
        f"{100 * records(out, 'new', 'old')['acc10fold']:.2f} ✓" in new_row
    other = md.split("### Other measures (no criterion)", 1)[1].split("Protocols", 1)[0]
    assert "acc10fold_std self" in other and "✓" not in other and "✗" not in other
    assert "## Compatibility certificates" in (out / "report.md").read_text()
    assert stored["flips"] == [] and "## Negative flips" not in md  # pair sets measure no top-1


def test_feature_files_are_matched_by_key_and_features_are_reused(world, monkeypatch):
    root, _, _, _ = world
    out = root / "ev-files"
    assert run("--protocol", "pairs", "--data", str(root / "toy.bin"), "--old", str(root / "old"),
               "--new", f"up={root / 'new'}", "--out", str(out)) == 0
    from safetensors.torch import load_file

    saved = load_file(str(out / "features" / "old.safetensors"))
    keys = bytes(saved["keys_blob"].numpy()).decode()
    off = saved["keys_offsets"].numpy()
    names = np.array([keys[off[i]:off[i + 1]] for i in range(len(off) - 1)])
    perm = np.random.default_rng(1).permutation(len(names))
    np.savez(root / "old-shuffled.npz", features=saved["feats"].numpy()[perm], keys=names[perm])
    import bctkit.extract

    calls = []
    original = bctkit.extract.extract_to_file
    monkeypatch.setattr(bctkit.extract, "extract_to_file",
                        lambda *a, **k: calls.append(a) or original(*a, **k))
    again = root / "ev-files"  # the same folder: the new model's features are reused
    assert run("--protocol", "pairs", "--data", str(root / "toy.bin"), "--old",
               str(root / "old-shuffled.npz"), "--new", f"up={root / 'new'}", "--out", str(again)) == 0
    assert calls == []
    first = records(out, "up", "old")
    assert first == records(again, "up", "old")


def test_retrieval_lists_with_models(world, tmp_path):
    _, nets, _, _ = world
    rng = np.random.default_rng(3)
    q_ids, g_ids = [0, 1, 2, 0], [0, 0, 1, 1, 2, 3, 3]  # identity 3: distractors
    lines = {}
    pix = {}
    for side, ids in (("query", q_ids), ("gallery", g_ids)):
        rows = []
        for i, ident in enumerate(ids):
            arr = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            name = f"{side}{i}.png"
            Image.fromarray(arr).save(tmp_path / name)
            pix.setdefault(side, []).append(arr)
            rows.append(f"{name} {ident}")
        lines[side] = tmp_path / f"{side}.txt"
        lines[side].write_text("\n".join(rows) + "\n")
    out = tmp_path / "ev"
    assert run("--protocol", "retrieval", "--data", str(lines["query"]), str(lines["gallery"]),
               "--old", str(world[0] / "old"), "--new", f"new={world[0] / 'new'}", "--out", str(out),
               "--topk", "1") == 0
    q = by_hand(nets["new"], pix["query"])
    g = by_hand(nets["old"], pix["gallery"])
    s = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    aps = []
    for i, ident in enumerate(q_ids):
        order = np.argsort(-s[i], kind="stable")
        rel = np.array(g_ids)[order] == ident
        hits = np.flatnonzero(rel)
        aps.append(np.mean([(k + 1) / (pos + 1) for k, pos in enumerate(hits)]))
    assert records(out, "new", "old")["map"] == pytest.approx(np.mean(aps), abs=1e-6)

    def top1_hits(query_model: str) -> np.ndarray:
        fq, fg = by_hand(nets[query_model], pix["query"]), by_hand(nets["old"], pix["gallery"])
        fq, fg = (f / np.linalg.norm(f, axis=1, keepdims=True) for f in (fq, fg))
        return np.array(g_ids)[(fq @ fg.T).argmax(1)] == np.array(q_ids)

    # the test set's report has the flips too (the random nets' counts here may be 0: the counting
    # itself is checked in test_flips and test_certificate)
    ref, hits = top1_hits("old"), top1_hits("new")
    flips = json.loads((out / "report.json").read_text())["flips"]
    entry = next(f for f in flips if (f["query_model"], f["gallery_model"]) == ("new", "old"))
    assert (entry["negative_flips"], entry["positive_flips"], entry["n"]) == (
        int((ref & ~hits).sum()), int((~ref & hits).sum()), len(q_ids))


@pytest.mark.parametrize("args, message", [
    (["--protocol", "ijbc"], "needs --data"),
    (["--protocol", "pairs", "--data", "missing.bin"], "missing.bin: not found"),
    (["--protocol", "retrieval", "--data", "a.txt"], "needs --data with 2 path(s)"),
    (["--protocol", "roxford", "--data", "a", "b", "c"],
     "--protocol roxford needs --data with 1 or 2 path(s)"),
    (["--protocol", "loo", "--data", "a", "b"], "--protocol loo needs --data with 1 path(s)"),
    (["--protocol", "gldv2", "--data", "missing"], "--data missing: not found"),
    (["--protocol", "split", "--data", "x"], "--data is for the test-set protocols"),
    (["--protocol", "split", "--flip"], "--flip applies only to a test-set --protocol"),
    (["--protocol", "pairs", "--data", "x.bin", "--gallery-per-class", "2"],
     "--gallery-per-class applies only to --protocol split"),
])
def test_bad_command_lines_are_one_line_errors(world, capsys, args, message):
    root = world[0]
    code = main(["evaluate", *args, "--old", str(root / "old"), "--new", str(root / "new"),
                 "--out", str(root / "bad")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err


def test_a_feature_file_of_other_images_is_refused(world, capsys):
    root = world[0]
    np.save(root / "short.npy", np.ones((7, DIM), np.float32))
    code = main(["evaluate", "--protocol", "pairs", "--data", str(root / "toy.bin"), "--old",
                 str(root / "short.npy"), "--new", str(root / "new"), "--out", str(root / "bad2"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "short.npy: 7 rows" in err and "\n" not in err


def test_market_with_models_applies_the_junk_rules(world, tmp_path):
    """Through the CLI: gallery images of the query's person and camera, and person -1, are left
    out of the ranking; person 0000 stays in it as a non-match."""
    _, nets, _, _ = world
    rng = np.random.default_rng(5)
    names = {"query": ["0001_c1s1_000001_00.png", "0002_c2s1_000001_00.png"],
             "bounding_box_test": ["0001_c1s1_000002_00.png", "0001_c3s1_000001_00.png",
                                   "0002_c1s1_000005_00.png", "0002_c2s1_000009_00.png",
                                   "-1_c1s1_000003_00.png", "0000_c2s1_000004_00.png",
                                   "0003_c1s1_000007_00.png", "0001_c4s1_000008_00.png"]}
    pix = {}
    for folder, files in names.items():
        (tmp_path / "m" / folder).mkdir(parents=True)
        for f in sorted(files):
            arr = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "m" / folder / f)
            pix.setdefault(folder, []).append((f, arr))
    out = tmp_path / "ev"
    assert run("--protocol", "market", "--data", str(tmp_path / "m"), "--old", str(world[0] / "old"),
               "--new", f"new={world[0] / 'new'}", "--out", str(out), "--topk", "1") == 0
    q = by_hand(nets["new"], [a for _, a in pix["query"]])
    g = by_hand(nets["old"], [a for _, a in pix["bounding_box_test"]])
    gname = [f for f, _ in pix["bounding_box_test"]]
    aps = []
    for i, (qf, _) in enumerate(pix["query"]):
        pid, cam = qf.split("_")[0], qf.split("_")[1][:2]
        keep = [j for j, f in enumerate(gname) if f.split("_")[0] != "-1"
                and not (f.split("_")[0] == pid and f.split("_")[1][:2] == cam)]
        s = cosine_rows(np.repeat(q[i:i + 1], len(keep), 0), g[keep])
        order = [keep[j] for j in np.argsort(-s, kind="stable")]
        hits = [r for r, j in enumerate(order) if gname[j].split("_")[0] == pid]
        aps.append(np.mean([(k + 1) / (r + 1) for k, r in enumerate(hits)]))
    assert records(out, "new", "old")["map"] == pytest.approx(np.mean(aps), abs=1e-6)


def test_a_feature_file_with_corrupt_metadata_is_one_line(world, capsys):
    """The header is read once, by the project's header reader: corrupt metadata JSON is named, not
    a traceback."""
    from safetensors.torch import save_file

    root = world[0]
    save_file({"feats": torch.ones(60, DIM)}, str(root / "corrupt.safetensors"),
              metadata={"bctkit": "{not json"})
    code = main(["evaluate", "--protocol", "pairs", "--data", str(root / "toy.bin"), "--old",
                 str(root / "corrupt.safetensors"), "--new", str(root / "new"), "--out", str(root / "bad3"),
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "corrupt bctkit metadata" in err and "\n" not in err


def test_features_with_no_common_coordinates_are_refused_naming_the_files(world, capsys):
    root = world[0]
    np.save(root / "old8.npy", np.ones((60, 8), np.float32))
    np.save(root / "new6.npy", np.ones((60, 6), np.float32))
    code = main(["evaluate", "--protocol", "pairs", "--data", str(root / "toy.bin"), "--old",
                 str(root / "old8.npy"), "--new", f"n={root / 'new6.npy'}", "--out", str(root / "bad4"),
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"model 'n' ({root / 'new6.npy'}): its 6-d features cannot be compared with the 8-d" in err
    assert not (root / "bad4" / "report.json").exists()
