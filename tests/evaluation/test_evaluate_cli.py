"""``bctkit evaluate`` as users call it: the TAR@FAR mode from the command line, each protocol's own
default rates, options refused where they do not apply, and what report.md says about the test."""

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from bctkit.cli import main
from tests.evaluation.test_testset import DIM, by_hand, cosine_rows, records, run, world  # noqa: F401


def insightface_tar(labels: np.ndarray, scores: np.ndarray, far: float) -> float:
    """insightface's IJB rule, as its evaluation scripts write it: sklearn's ROC, reversed, and the
    TPR at the FPR nearest the FAR."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return float(tpr[np.argmin(abs(fpr - far))])


def test_pairs_tar_mode_insightface_from_the_command_line(world, tmp_path):  # noqa: F811
    root, nets, images, issame = world
    out = tmp_path / "ev"
    assert run("--protocol", "pairs", "--data", str(root / "toy.bin"), "--old", str(root / "old"),
               "--new", f"new={root / 'new'}", "--out", str(out), "--fars", "0.1", "0.3",
               "--tar-mode", "insightface") == 0
    feats = {n: by_hand(net, images) for n, net in nets.items()}
    for q, g in [("new", "old"), ("old", "old")]:
        scores = cosine_rows(feats[q][0::2], feats[g][1::2])
        got = records(out, q, g)
        for far, name in ((0.1, "tar@far=1e-1"), (0.3, "tar@far=3e-1")):
            assert got[name] == pytest.approx(insightface_tar(issame, scores, far), abs=1e-12)
    rep = json.loads((out / "report.json").read_text())
    assert rep["test_set"]["tar_mode"] == "insightface"
    tar = next(r for r in rep["results"] if r["metric"] == "tar@far=1e-1")
    assert "insightface TAR@FAR" in tar["protocol"] and "exact TAR@FAR" not in tar["protocol"]
    cert = json.loads((out / "certificates" / "new__old.json").read_text())
    assert cert["protocol"]["tar_mode"] == "insightface"


def test_pairs_uses_its_own_default_fars(world, tmp_path):  # noqa: F811
    root = world[0]
    out = tmp_path / "ev"
    assert run("--protocol", "pairs", "--data", str(root / "toy.bin"), "--old", str(root / "old"),
               "--new", f"new={root / 'new'}", "--out", str(out)) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["test_set"]["fars"] == [1e-3, 1e-2] and rep["test_set"]["tar_mode"] == "exact"
    assert sorted(m for m in records(out, "new", "old") if m.startswith("tar@")) == ["tar@far=1e-2",
                                                                                   "tar@far=1e-3"]


@pytest.mark.parametrize("args, message", [
    (["--protocol", "pairs", "--data", "x.bin", "--score-weighting"],
     "--score-weighting applies only to --protocol ijbb or ijbc, not to --protocol pairs"),
    (["--protocol", "ijbc", "--data", "x", "--folds", "10"],
     "--folds applies only to --protocol pairs, not to --protocol ijbc"),
    (["--protocol", "ijbc", "--data", "x", "--query-folder", "query"],
     "--query-folder applies only to --protocol market, not to --protocol ijbc"),
    (["--protocol", "pairs", "--data", "x.bin", "--fpirs", "0.1"],
     "--fpirs applies only to --protocol split, ijbb or ijbc, not to --protocol pairs"),
    (["--protocol", "pairs", "--data", "x.bin", "--topk", "1"],
     "--topk applies only to --protocol split, ijbb, ijbc, retrieval, market or loo, not to --protocol "
     "pairs"),
    (["--protocol", "market", "--data", "x", "--fars", "0.1"],
     "--fars applies only to --protocol split, ijbb, ijbc or pairs, not to --protocol market"),
    (["--protocol", "pairs", "--data", "x.bin", "--block", "64"],
     "--block applies only to --protocol retrieval, market, loo, roxford, rparis or gldv2, not to --protocol "
     "pairs"),
    (["--protocol", "retrieval", "--data", "a", "b", "--ap", "trapezoid"],
     "--ap applies only to --protocol market, not to --protocol retrieval"),
    (["--protocol", "market", "--data", "x", "--tar-mode", "insightface"],
     "--tar-mode applies only to --protocol ijbb, ijbc or pairs, not to --protocol market"),
    (["--tar-mode", "exact"], "--tar-mode applies only to --protocol ijbb, ijbc or pairs, not to --protocol "
                              "split"),
    (["--protocol", "split", "--precision", "fp32"],
     "--precision applies only to a test-set --protocol (ijbb, ijbc, pairs, retrieval, market, loo, roxford, "
     "rparis, gldv2)"),
    (["--protocol", "roxford", "--data", "x", "--topk", "1"],
     "--topk applies only to --protocol split, ijbb, ijbc, retrieval, market or loo, not to --protocol "
     "roxford"),
    (["--protocol", "pairs", "--data", "x.bin", "--no-backfill"],
     "--no-backfill applies only to --protocol split, not to --protocol pairs"),
])
def test_options_of_another_protocol_are_refused(world, tmp_path, capsys, args, message):  # noqa: F811
    root = world[0]
    out = tmp_path / "bad"
    code = main(["evaluate", *args, "--old", str(root / "old"), "--new", str(root / "new"), "--out",
                 str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not out.exists()


def test_flip_with_a_feature_file_is_refused(world, tmp_path, capsys):  # noqa: F811
    root = world[0]
    np.save(tmp_path / "old.npy", np.ones((60, DIM), np.float32))
    out = tmp_path / "bad"
    code = main(["evaluate", "--protocol", "pairs", "--data", str(root / "toy.bin"), "--new",
                 f"new={root / 'new'}", "--old", str(tmp_path / "old.npy"), "--out", str(out), "--flip",
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"--flip: old={tmp_path / 'old.npy'} is a feature file" in err
    assert not out.exists()


def section(md: str, title: str) -> list[str]:
    """The lines of report.md's section ``title`` (to the next heading)."""
    body = md.split(title, 1)[1].split("\n#", 1)[0]
    return [ln for ln in body.splitlines() if ln.startswith("|")]


def test_pairs_report_md(world, tmp_path, capsys):  # noqa: F811
    """n/m (not "—") for values the impostors cannot measure, in the matrices too; the update gain of
    the pair set's headline metric; the Dataset line; no literal None; the [plots] line names only
    the plots written."""
    root = world[0]
    out = tmp_path / "ev"
    assert main(["evaluate", "--protocol", "pairs", "--data", str(root / "toy.bin"), "--old",
                 str(root / "old"), "--new", f"new={root / 'new'}", "--paragon", str(root / "new"),
                 "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    md = (out / "report.md").read_text()
    rep = json.loads((out / "report.json").read_text())
    assert all(r["value"] is None for r in rep["results"] if r["metric"] == "tar@far=1e-3")  # 15 impostors
    rows = section(md, "## Compatibility matrix: tar@far=1e-3")[2:]
    assert len(rows) == 3 and all(row.count("n/m") == 3 and "—" not in row for row in rows)
    gain = section(md, "## Update gain")
    assert gain[0].startswith("| model | acc10fold |")
    assert f"Dataset: toy: 60 images. Protocol **pairs**, data: {root / 'toy.bin'}." in md
    models = section(md, "## Models")
    assert "None" not in "\n".join(models) and "not recorded" in models[2]
    plots_line = next(ln for ln in stdout.splitlines() if ln.startswith("[plots]"))
    assert plots_line == "[plots] " + ", ".join(rep["plots"])
    assert "cmc" not in plots_line and "backfill" not in plots_line


def test_split_report_md_dataset_backfill_and_models(tmp_path, monkeypatch):
    """The split form's report: a Dataset line naming the feature files, each backfill order explained
    (and how it relates to the gallery's), the backfill legend's area in % as the table gives it, and
    "not recorded" for a model's unknown training images."""
    import torch

    import bctkit.evaluation.plots as plots
    from bctkit.features import FeatureSet

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(4)
    centres = torch.randn(8, 16, generator=gen)
    meta = {"dataset": "toy", "train_images": None, "num_classes": None}
    for name, noise in (("old", 0.8), ("new", 0.5)):
        feats = centres[labels] + noise * torch.randn(32, 16, generator=gen)
        FeatureSet(feats, labels, {**meta, "model": name}).save(tmp_path / f"{name}.safetensors")
    legends = []

    def grab(fig, path):
        if Path(path).name == "backfill.png":
            legends.extend(t.get_text() for t in fig.axes[0].get_legend().get_texts())
        return real(fig, path)

    real = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", grab)
    out = tmp_path / "ev"
    assert main(["evaluate", "--old", str(tmp_path / "old.safetensors"), "--new",
                 str(tmp_path / "new.safetensors"), "--fars", "0.1", "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    rep = json.loads((out / "report.json").read_text())
    assert (f"Dataset: toy: 32 images. Protocol **split**, feature files: "
            f"old={tmp_path / 'old.safetensors'}, new={tmp_path / 'new.safetensors'}.") in md
    backfill = md.split("## Partial backfill", 1)[1].split("\n## ", 1)[0]
    assert "random: " in backfill and "distance: " in backfill and "--order benefit" in backfill
    rows = section(md, "## Partial backfill")
    for order in ("random", "distance"):
        area = f"{100 * rep['backfill']['new'][order]['area']:.2f}"
        assert any(r.startswith(f"| new | {order} |") and r.endswith(f"| {area} |") for r in rows)
        assert f"new ({order}) (area {area} %)" in legends
    models = section(md, "## Models")
    assert "None" not in "\n".join(models) and "| not recorded | not recorded |" in models[2]


def _lists(tmp_path: Path, sides: dict[str, list[int]]) -> dict[str, Path]:
    """One 'path label' list per side, each image a random PNG under ``tmp_path``."""
    from PIL import Image

    from tests.evaluation.test_testset import SIZE

    rng = np.random.default_rng(3)
    out = {}
    for side, ids in sides.items():
        rows = []
        for i, ident in enumerate(ids):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"{side}{i}.png")
            rows.append(f"{side}{i}.png {ident}")
        out[side] = tmp_path / f"{side}.txt"
        out[side].write_text("\n".join(rows) + "\n")
    return out


def test_retrieval_with_queries_in_the_gallery_warns(world, tmp_path, capsys):  # noqa: F811
    """The same list as queries and gallery: every query finds itself (self top-1 = 100 %); the
    CLI says so on stderr and report.md / report.json carry the warning. Distinct lists: none."""
    lists = _lists(tmp_path, {"query": [0, 1, 2, 0], "gallery": [0, 0, 1, 1, 2, 3, 3]})
    root = world[0]
    same = tmp_path / "same"
    assert main(["evaluate", "--protocol", "retrieval", "--data", str(lists["gallery"]),
                 str(lists["gallery"]), "--old", str(root / "old"), "--new", f"new={root / 'new'}", "--out",
                 str(same), "--topk", "1", "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    warning = "7 of 7 queries are also gallery images (the same files): each matches itself"
    assert len([ln for ln in err if ln.startswith("warning: ") and warning in ln]) == 1
    assert records(same, "old", "old")["top1"] == 1.0
    rep = json.loads((same / "report.json").read_text())
    assert len(rep["warnings"]) == 1 and warning in rep["warnings"][0]
    assert rep["test_set"]["queries_also_in_gallery"] == 7
    assert f"- **Warning**: {rep['warnings'][0]}" in (same / "report.md").read_text()
    other = tmp_path / "other"
    assert main(["evaluate", "--protocol", "retrieval", "--data", str(lists["query"]),
                 str(lists["gallery"]), "--old", str(root / "old"), "--new", f"new={root / 'new'}", "--out",
                 str(other), "--topk", "1", "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
    rep = json.loads((other / "report.json").read_text())
    assert rep["warnings"] == [] and "Warning" not in (other / "report.md").read_text()


def test_market_ap_trapezoid_with_npy_rows_in_name_order(tmp_path):
    """--ap trapezoid reaches the protocol, and a .npy's rows are the queries then the gallery, each
    sorted by file name (as docs/evaluation.md says): mAP against the Market-1501 MATLAB rule
    computed here on that order."""
    from PIL import Image

    names = {"query": ["0002_c2s1_000001_00.png", "0001_c1s1_000001_00.png"],
             "bounding_box_test": ["0001_c3s1_000001_00.png", "0001_c1s1_000002_00.png",
                                   "0002_c1s1_000005_00.png", "-1_c1s1_000003_00.png",
                                   "0000_c2s1_000004_00.png", "0002_c3s1_000009_00.png",
                                   "0001_c4s1_000008_00.png", "0003_c1s1_000007_00.png"]}
    for folder, files in names.items():
        (tmp_path / "m" / folder).mkdir(parents=True)
        for f in files:
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "m" / folder / f)
    rows = sorted(names["query"]) + sorted(names["bounding_box_test"])
    rng = np.random.default_rng(7)
    feats = {n: rng.normal(size=(len(rows), 5)).astype(np.float32) for n in ("old", "new")}
    for n, f in feats.items():
        np.save(tmp_path / f"{n}.npy", f)
    out = tmp_path / "ev"
    assert main(["evaluate", "--protocol", "market", "--data", str(tmp_path / "m"), "--old",
                 str(tmp_path / "old.npy"), "--new", f"new={tmp_path / 'new.npy'}", "--out", str(out),
                 "--topk", "1", "--ap", "trapezoid", "--quiet"]) == 0
    nq = len(names["query"])
    q = feats["new"][:nq] / np.linalg.norm(feats["new"][:nq], axis=1, keepdims=True)
    g = feats["old"][nq:] / np.linalg.norm(feats["old"][nq:], axis=1, keepdims=True)
    gal = rows[nq:]
    aps = []
    for i, qf in enumerate(rows[:nq]):
        pid, cam = qf.split("_")[0], qf.split("_")[1][:2]
        keep = [j for j, f in enumerate(gal) if f.split("_")[0] != "-1"
                and not (f.split("_")[0] == pid and f.split("_")[1][:2] == cam)]
        order = [keep[j] for j in np.argsort(-(g[keep] @ q[i]), kind="stable")]
        hits = [r + 1 for r, j in enumerate(order) if gal[j].split("_")[0] == pid]
        aps.append(np.mean([((k / (r - 1) if r > 1 else 1.0) + (k + 1) / r) / 2 for k, r in enumerate(hits)]))
    rec = next(r for r in json.loads((out / "report.json").read_text())["results"]
               if (r["query_model"], r["gallery_model"], r["metric"]) == ("new", "old", "map"))
    assert rec["value"] == pytest.approx(np.mean(aps), abs=1e-6) and "AP = trapezoid" in rec["protocol"]


def test_chain_and_matrix_cells_tell_not_measurable_from_missing():
    """A NaN record is n/m in the matrix and chain tables; a pair with no record (coordinates not
    comparable) is —."""
    from bctkit.evaluation.report import markdown

    names = ["old", "v2"]
    recs = [{"query_model": q, "gallery_model": g, "metric": "tar@far=1e-3", "value": v, "n": 10,
             "protocol": "p"} for (q, g), v in {("old", "old"): 0.5, ("v2", "v2"): 0.6,
                                                 ("v2", "old"): float("nan")}.items()]
    info = {"embedding_dim": 8, "fingerprint": "f", "train_images": 10, "num_classes": 2}
    report = {"results": recs, "models": {n: info for n in names},
              "matrices": {"tar@far=1e-3": {"models": names, "values": [[0.5, None], [None, 0.6]]}},
              "chain": {"models": names, "tar@far=1e-3": {"AC": 0.0, "AM": 0.0, "BC": 0.0, "FC": 0.0,
                                                          "criterion": [[None, None], [False, None]],
                                                          "matrix": [[0.5, None], [None, 0.6]]}}}
    md = markdown(report)
    matrix = section(md, "## Compatibility matrix: tar@far=1e-3")
    assert matrix[2:] == ["| old | 50.00 | — |", "| v2 | n/m | 60.00 |"]
    chain = md.split("tar@far=1e-3 (✓ / ✗", 1)[1]
    assert "| v2 | n/m ✗ | 60.00 |" in chain and "| old | 50.00 | — |" in chain
