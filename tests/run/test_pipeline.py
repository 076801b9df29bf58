"""End to end on a tiny config: report schema, feature files, resume, CLI exit codes."""

import json
import math
import shutil

import pytest
import torch
import yaml

from bctkit.cli import main
from bctkit.errors import ConfigError
from bctkit.evaluation.diagnosis import NEAR_MARGIN
from bctkit.features import FeatureSet, load_features
from bctkit.models.store import load_model
from bctkit.run.config import load_config
from bctkit.run.launch import run_pipeline
from bctkit.storage import json_safe

TINY = {
    "data": {"synthetic": {"num_classes": 12, "images_per_class": 6, "size": 16, "seed": 1},
             "eval_classes": 6, "eval_images_per_class": 4},
    "old": {"backbone": {"arch": "r8", "width": 4, "embedding_dim": 8, "image_size": 16},
            "train": {"epochs": 2, "batch_size": 16, "schedule": {"name": "constant"}}},
    "new": {"backbone": {"arch": "r8", "width": 4, "embedding_dim": 12, "image_size": 16},
            "train": {"epochs": 2, "batch_size": 16, "schedule": {"name": "constant"}}},
    "methods": [{"method": "l2"}, {"method": "l2", "name": "l2-weak", "params": {"threshold": 0.2}}],
    "evaluation": {"fars": [1e-3, 0.1], "topk": [1, 5]},
}


def pick(rep, query, gallery, metric):
    return next(r["value"] for r in rep["results"]
                if (r["query_model"], r["gallery_model"], r["metric"]) == (query, gallery, metric))


def _run_config(tmp_path_factory, name, tree):
    """Write ``tree`` as NAME.yaml and run it into OUT/r; (out, config path, report, log lines)."""
    out = tmp_path_factory.mktemp(name)
    cfg_path = out / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    logs: list[str] = []
    report = run_pipeline(load_config(cfg_path), out / "r", progress=False, log=logs.append)
    return out, cfg_path, report, logs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _run_config(tmp_path_factory, "tiny", TINY)


def test_report_schema(tiny_run):
    out, _, report, _ = tiny_run
    on_disk = json.loads((out / "r" / "report.json").read_text())
    assert on_disk["results"] == json_safe(report["results"])
    assert set(on_disk["models"]) == {"old", "paragon", "l2", "l2-weak"}
    for info in on_disk["models"].values():
        assert {"config", "fingerprint", "train_images"} <= set(info)
    assert on_disk["models"]["old"]["train_images"] == on_disk["allocation"]["old_images"]
    assert on_disk["models"]["l2"]["compat_dims"] == 8
    assert on_disk["config"]["new"]["backbone"]["embedding_dim"] == 12
    keys = {"query_model", "gallery_model", "metric", "value", "n", "protocol"}
    pairs = set()
    for rec in on_disk["results"]:
        assert set(rec) == keys
        assert rec["n"] > 0 and rec["protocol"]
        pairs.add((rec["query_model"], rec["gallery_model"]))
    metrics = {r["metric"] for r in on_disk["results"]}
    assert {"top1", "top5", "tar@far=1e-3", "tar@far=1e-1", "auc"} <= metrics
    # 12-dim models are comparable with the 8-dim old model only through l2's compat_dims
    assert ("l2", "old") in pairs and ("old", "l2-weak") in pairs
    assert ("paragon", "old") not in pairs and ("paragon", "l2") in pairs
    n_pairs = 24 * 23 // 2
    tar = [r for r in on_disk["results"] if r["metric"] == "tar@far=1e-3"]
    assert all(r["n"] == n_pairs and r["value"] is None for r in tar)  # 1e-3 * 216 < 1
    comp = on_disk["compatibility"]["l2"]["top1"]
    cross = next(r["value"] for r in on_disk["results"]
                 if (r["query_model"], r["gallery_model"], r["metric"]) == ("l2", "old", "top1"))
    assert comp["cross"] == cross and comp["criterion"] == (cross > comp["old_self"])
    assert {"tpir@fpir=1e-1", "map", "map@r"} <= metrics
    top1 = on_disk["matrices"]["top1"]
    assert top1["models"] == ["old", "paragon", "l2", "l2-weak"]
    assert top1["values"][1][0] is None  # paragon (12 dims) cannot query the 8-dim old gallery
    curve = on_disk["backfill"]["l2"]["random"]
    assert curve["fractions"][0] == 0 and curve["fractions"][-1] == 1
    assert math.isclose(curve["values"][0], cross)
    for plot in on_disk["plots"]:
        assert (out / "r" / plot).read_bytes()[:4] == b"\x89PNG"
    assert {"roc.png", "cmc.png", "backfill.png"} <= set(on_disk["plots"])
    md = (out / "r" / "report.md").read_text()
    assert "| l2 |" in md and ("✓" in md or "✗" in md)
    # every failed or nearly failed claim is diagnosed, with a sample of the new models' training images
    near = [c["query"] for c in on_disk["certificate_results"]
            if not c["passed"] or c["cross"] - c["old_self"] < NEAR_MARGIN]
    assert [d["query"] for d in on_disk["diagnosis"]] == near
    for d in on_disk["diagnosis"]:
        train = d["train"]
        assert train["images"] == on_disk["allocation"]["new_images"]  # 72 images, below the sample size
        assert train["known_images"] + train["unseen_images"] == train["images"]
        assert f"### {d['query']} → old" in md and d["advice"] in md
    # the Models table shows every option a method ran with, defaults included (the config gave none)
    assert "| l2 | l2 | weight=10.0, threshold=0.0, normalize=True, squared=False |" in md
    assert on_disk["models"]["l2-weak"]["params"] == {"weight": 10.0, "threshold": 0.2, "normalize": True,
                                                      "squared": False}


def test_feature_files(tiny_run):
    out, _, report, _ = tiny_run
    fs = load_features(out / "r" / "features" / "l2.safetensors")
    assert fs.feats.shape == (24, 12) and fs.compat_dims == 8
    assert fs.meta["model_fingerprint"] == report["models"]["l2"]["fingerprint"]


def test_resume_reuses_everything(tiny_run):
    out, cfg_path, report, _ = tiny_run
    logs: list[str] = []
    again = run_pipeline(load_config(cfg_path), out / "r", resume=True, progress=False, log=logs.append)
    assert sum("reusing finished model" in line for line in logs) == 4
    assert any("reusing old features" in line for line in logs)
    assert again["results"] == report["results"]


def test_resume_keys_ignore_eval_set_and_paragon_ignores_old(tiny_run, tmp_path):
    out, cfg_path, _, _ = tiny_run
    run_dir = tmp_path / "r"
    shutil.copytree(out / "r", run_dir)
    logs: list[str] = []
    bigger = load_config(cfg_path, ["data.eval_classes=8"])
    rep = run_pipeline(bigger, run_dir, resume=True, progress=False, log=logs.append)
    assert sum("reusing finished model" in line for line in logs) == 4
    assert rep["results"][0]["n"] > 0 and "8 ids" in rep["results"][0]["protocol"]
    logs.clear()
    weaker_old = load_config(cfg_path, ["old.train.epochs=1"])
    # a one-epoch run warms its margin head up over half an epoch (the default 1 must end before it)
    with pytest.raises(ConfigError, match=r"finished old model of another configuration \(the run's config "
                                          r"differs in data.eval_classes, old.train.epochs, "
                                          r"old.train.schedule.warmup_epochs\).*--overwrite"):
        run_pipeline(weaker_old, run_dir, resume=True, progress=False, log=logs.append)
    run_pipeline(weaker_old, run_dir, resume=True, progress=False, log=logs.append, overwrite=True)
    reused = [line for line in logs if "reusing finished model" in line]
    assert len(reused) == 1 and "[paragon]" in reused[0]


def _top1(query: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor) -> float:
    """Closed-set top-1 with the first image of each identity as its gallery, by a direct loop."""
    first = {}
    for i, y in enumerate(labels.tolist()):
        first.setdefault(y, i)
    g_idx = torch.tensor(sorted(first.values()))
    g = torch.nn.functional.normalize(gallery[g_idx].double(), dim=1)
    hits, probes = 0, 0
    for i in range(len(labels)):
        if i in first.values():
            continue
        q = torch.nn.functional.normalize(query[i].double(), dim=0)
        hits += int(labels[g_idx[int(torch.argmax(g @ q))]] == labels[i])
        probes += 1
    return hits / probes


def test_validation_split_reuses_the_models_and_reports_beside_the_test_report(tiny_run, tmp_path, capsys):
    out, cfg_path, report, _ = tiny_run
    run_dir = tmp_path / "r"
    shutil.copytree(out / "r", run_dir)
    test_report = (run_dir / "report.json").read_bytes()
    logs: list[str] = []
    cfg = load_config(cfg_path, ["data.validation_classes=5", "evaluation.split=validation"])
    rep = run_pipeline(cfg, run_dir, resume=True, progress=False, log=logs.append)
    assert sum("reusing finished model" in line for line in logs) == 4
    assert not any("training on" in line for line in logs)
    assert (run_dir / "report.json").read_bytes() == test_report
    on_disk = json.loads((run_dir / "validation" / "report.json").read_text())
    assert on_disk["results"] == json_safe(rep["results"])
    assert "validation split" in on_disk["dataset"] and "5 ids" in on_disk["results"][0]["protocol"]
    saved = json.loads((run_dir / "validation" / "config.json").read_text())
    assert saved["evaluation"]["split"] == "validation"
    old = load_features(run_dir / "validation" / "features" / "old.safetensors")
    l2 = load_features(run_dir / "validation" / "features" / "l2.safetensors")
    assert old.feats.shape == (20, 8) and torch.equal(old.labels, torch.arange(5).repeat_interleave(4))
    assert pick(rep, "l2", "old", "top1") == pytest.approx(_top1(l2.feats[:, :8], old.feats, old.labels))
    test_old = load_features(run_dir / "features" / "old.safetensors")
    assert not any(torch.allclose(v, t) for v in old.feats for t in test_old.feats)
    args = ["run", str(cfg_path), "--out", str(tmp_path / "x"), "--set", "evaluation.split=validation"]
    assert main(args) == 2
    assert "evaluation.split=validation needs data.validation_classes >= 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_reuse_old_from_copies_the_old_model_only(tiny_run, tmp_path, capsys):
    out, cfg_path, report, _ = tiny_run
    logs: list[str] = []
    rep = run_pipeline(load_config(cfg_path, ["new.train.seed=5"]), tmp_path / "s5", progress=False,
                       log=logs.append, reuse_old_from=out / "r")
    assert any(line.startswith("[old] reusing") for line in logs)
    assert not any(line.startswith("[old] training") for line in logs)
    assert rep["models"]["old"]["fingerprint"] == report["models"]["old"]["fingerprint"]
    assert rep["models"]["paragon"]["fingerprint"] != report["models"]["paragon"]["fingerprint"]
    copied = load_model(tmp_path / "s5" / "models" / "old" / "model.safetensors")
    assert copied.fingerprint == report["models"]["old"]["fingerprint"]
    assert pick(rep, "old", "old", "top1") == pick(report, "old", "old", "top1")
    # another old-model config, a missing run: one-line errors, exit 2, nothing trained or created
    args = ["run", str(cfg_path), "--out", str(tmp_path / "bad"), "--quiet", "--reuse-old-from",
            str(out / "r"), "--set", "old.train.epochs=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bctkit: error: --reuse-old-from") and "another old-model config" in err
    assert not (tmp_path / "bad" / "models" / "old").exists()
    assert main(["run", str(cfg_path), "--out", str(tmp_path / "none"), "--reuse-old-from",
                 str(tmp_path / "missing")]) == 2
    assert "no finished old model at" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    assert main(["run", str(cfg_path), "--out", str(tmp_path / "sc"), "--scenarios", "open-data",
                 "--reuse-old-from", str(out / "r")]) == 2
    assert "open-data/models/old/model.safetensors" in capsys.readouterr().err


def test_cli_quick_demo_packaged_config(tmp_path, capsys):
    small = ["data.dataset=synthetic", "data.synthetic.num_classes=12", "data.synthetic.images_per_class=6",
             "data.eval_classes=6", "data.eval_images_per_class=4", "old.train.epochs=2",
             "new.train.epochs=2"]
    args = ["demo", "--quick", "--out", str(tmp_path / "d"), "--quiet"]
    for item in small:
        args += ["--set", item]
    assert main(args) == 0
    rep = json.loads((tmp_path / "d" / "report.json").read_text())
    assert set(rep["models"]) == {"old", "paragon", "l2", "bct"}
    assert rep["allocation"]["scenario"] == "extended-data"


def test_cli_errors_exit_2(tiny_run, tmp_path, capsys):
    _, cfg_path, _, _ = tiny_run
    assert main(["run", str(tmp_path / "none.yaml"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "none.yaml: config file not found" in err
    assert main(["run", str(cfg_path), "--out", str(tmp_path), "--set", "methods.0.method=bct2"]) == 2
    assert "unknown method 'bct2'" in capsys.readouterr().err
    assert main(["run", str(cfg_path), "--out", str(tmp_path), "--set", "old.train.epochs=-1"]) == 2
    assert "old.train.epochs" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["run", str(cfg_path), "--out", str(blocker / "sub"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"bctkit: error: --out {blocker / 'sub'}: cannot be a folder: {blocker} is a file\n"
    assert main(["run", "no-such-config", "--out", str(tmp_path)]) == 2
    assert "packaged: [" in capsys.readouterr().err
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bctkit run: error: the following arguments are required") and err.count("\n") == 1


def test_cli_methods(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "l2: weight=10.0" in out
    assert "independent" not in out  # the paragon, which configs refuse as a method


def test_cli_evaluate_feature_files(tiny_run, tmp_path, capsys):
    out, _, report, _ = tiny_run
    feats = out / "r" / "features"
    args = ["evaluate", "--old", str(feats / "old.safetensors"), "--new", str(feats / "l2.safetensors"),
            "--new", f"weak={feats / 'l2-weak.safetensors'}", "--fars", "0.1", "--out", str(tmp_path / "ev")]
    assert main(args) == 0
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert set(ev["models"]) == {"old", "l2", "weak"}

    assert pick(ev, "l2", "old", "top1") == pick(report, "l2", "old", "top1")
    assert pick(ev, "weak", "old", "tar@far=1e-1") == pick(report, "l2-weak", "old", "tar@far=1e-1")
    assert (tmp_path / "ev" / "report.md").exists()
    chain = args + ["--chain"]
    chain[chain.index(str(tmp_path / "ev"))] = str(tmp_path / "ev-chain")
    assert main(chain) == 0
    ch = json.loads((tmp_path / "ev-chain" / "report.json").read_text())["chain"]
    assert ch["models"] == ["old", "l2", "weak"]
    m = {(q, g): pick(ev, q, g, "top1") for q in ch["models"] for g in ch["models"]}
    wins = [m[("l2", "old")] > m[("old", "old")], m[("weak", "old")] > m[("old", "old")],
            m[("weak", "l2")] > m[("l2", "l2")]]
    assert ch["top1"]["AC"] == pytest.approx(sum(wins) / 3)
    assert ch["top1"]["AM"] == pytest.approx((m[("l2", "old")] + m[("weak", "old")] + m[("weak", "l2")]) / 3)
    bc = (m[("weak", "old")] - m[("old", "old")] + m[("weak", "l2")] - m[("l2", "l2")]) / 2
    assert ch["top1"]["BC"] == pytest.approx(bc)
    only = ["evaluate", "--old", str(feats / "old.safetensors"), "--new", str(feats / "l2.safetensors"),
            "--fars", "0.1", "--tests", "verification", "--out", str(tmp_path / "ev1")]
    assert main(only) == 0
    ev1 = json.loads((tmp_path / "ev1" / "report.json").read_text())
    assert {r["metric"] for r in ev1["results"]} == {"tar@far=1e-1", "auc"}
    assert ev1["plots"] == ["roc.png"] and not ev1["backfill"]
    other = FeatureSet(torch.randn(3, 8), torch.tensor([0, 1, 1]), {})
    other.save(tmp_path / "other.safetensors")
    capsys.readouterr()
    bad = ["evaluate", "--old", str(feats / "old.safetensors"), "--new", str(tmp_path / "other.safetensors"),
           "--out", str(tmp_path / "ev2")]
    assert main(bad) == 2
    assert "labels differ" in capsys.readouterr().err


def test_cli_scenarios_summary(tmp_path, capsys):
    cfg = {**TINY, "methods": [{"method": "l2"}], "evaluation": {"fars": [0.1], "topk": [1, 2],
                                                               "backfill": False, "retrieval": False}}
    same = {**cfg, "new": {**cfg["new"], "backbone": cfg["old"]["backbone"]}}
    path = tmp_path / "c.yaml"
    # identical-data with the old architecture is refused before anything trains ...
    path.write_text(yaml.safe_dump(same))
    assert main(["run", str(path), "--out", str(tmp_path / "s"), "--scenarios", "open-class",
                 "identical-data"]) == 2
    assert "new.backbone equals old.backbone" in capsys.readouterr().err and not (tmp_path / "s").exists()
    # ... and runs with the override, which reaches identical-data's models only
    same["scenario_overrides"] = {"identical-data": {"new": {"backbone": {"width": 6}}}}
    path.write_text(yaml.safe_dump(same))
    args = ["run", str(path), "--out", str(tmp_path / "s"), "--quiet", "--scenarios", "open-class",
            "identical-data"]
    assert main(args) == 0
    width = {a: json.loads((tmp_path / "s" / a / "models" / "paragon" / "model.json").read_text())
             ["backbone"]["width"] for a in ("open-class", "identical-data")}
    assert width == {"open-class": 4, "identical-data": 6}
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert [(r["allocation"], r["model"]) for r in summary["rows"]] == [
        (a, m) for a in ("open-class", "identical-data") for m in ("old", "paragon", "l2")]
    rep = json.loads((tmp_path / "s" / "open-class" / "report.json").read_text())
    assert rep["allocation"]["scenario"] == "open-class" and rep["allocation"]["shared_classes"] == 0
    row = summary["rows"][2]
    assert row["top1 cross"] == pick(rep, "l2", "old", "top1")
    assert "| open-class | l2 |" in (tmp_path / "s" / "summary.md").read_text()
    assert (tmp_path / "s" / "summary_top1.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["run", str(path), "--out", str(tmp_path / "x"), "--scenarios", "closed"]) == 2
    # the validation split of the same run: nothing retrained, summary and reports under validation/
    test_summary = (tmp_path / "s" / "summary.json").read_bytes()
    capsys.readouterr()
    val_args = ["--resume", "--set", "data.validation_classes=3", "--set", "evaluation.split=validation"]
    assert main([*args, *val_args]) == 0
    assert "training on" not in capsys.readouterr().err
    assert (tmp_path / "s" / "summary.json").read_bytes() == test_summary
    val = json.loads((tmp_path / "s" / "validation" / "summary.json").read_text())
    val_rep = json.loads((tmp_path / "s" / "open-class" / "validation" / "report.json").read_text())
    assert val["rows"][2]["top1 cross"] == pick(val_rep, "l2", "old", "top1")
    assert "3 ids" in val_rep["results"][0]["protocol"]
    assert main(["aggregate", str(tmp_path / "s"), "--split", "validation", "--out",
                 str(tmp_path / "agg")]) == 0
    agg = json.loads((tmp_path / "agg" / "aggregate.json").read_text())
    row = next(r for r in agg["rows"] if (r["allocation"], r["model"]) == ("open-class", "l2"))
    assert row["top1 cross"]["mean"] == pick(val_rep, "l2", "old", "top1")
    assert main(["aggregate", str(tmp_path / "s" / "open-class"), "--split", "validation",
                 "--out", str(tmp_path / "agg2")]) == 2
    assert "no <allocation>/validation/report.json" in capsys.readouterr().err


CHAIN = {
    **TINY,
    "new": {**TINY["new"], "backbone": {**TINY["new"]["backbone"], "embedding_dim": 8}},
    "methods": [{"method": "bt2", "params": {"k": 4}}],
    "chain": [
        {"name": "v2", "method": "bct", "ratio": 0.5},
        {"name": "v3", "method": "bt2", "params": {"k": 4}},
        {"name": "v4", "method": "bt2", "params": {"k": 4}},
    ],
}


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    return _run_config(tmp_path_factory, "chain", CHAIN)


def test_chain_dims_accumulate_and_layout_is_saved(chain_run):
    out, _, report, logs = chain_run
    models = report["models"]
    assert [models[n]["embedding_dim"] for n in ("old", "v2", "v3", "v4", "bt2")] == [8, 8, 12, 16, 12]
    assert models["v2"]["train_images"] < models["v3"]["train_images"] == models["paragon"]["train_images"]
    v4 = load_features(out / "r" / "features" / "v4.safetensors")
    assert v4.compat_dims == 12 and v4.compat_prefixes == [12, 8]
    assert v4.meta["layout"] == {"bct": [0, 12], "added": [12, 16], "self_test": [0, 16],
                                 "cross_test": [0, 12], "f_dim": 8, "C": 2.0}
    assert load_features(out / "r" / "features" / "v2.safetensors").meta["layout"] is None
    # v3 is BT^2 on the run's new set: its independent target is the paragon, no extra model
    assert not any("v3-independent" in line for line in logs)
    assert any("v2" in line and "training on" in line for line in logs)


def test_chain_report_matrix_and_cross_dims(chain_run):
    out, _, report, _ = chain_run
    assert report["chain"]["models"] == ["old", "v2", "v3", "v4"]
    pairs = {(r["query_model"], r["gallery_model"]): r["protocol"] for r in report["results"]
             if r["metric"] == "top1"}
    assert pairs[("v4", "old")].endswith("query dims [0:8]")  # through v3's and v2's blocks
    assert pairs[("v4", "v3")].endswith("query dims [0:12]")
    assert pairs[("v4", "v4")].endswith("all 16 dims")
    assert pairs[("old", "v3")].endswith("gallery dims [0:8]")
    top1 = report["matrices"]["top1"]
    names = top1["models"]
    assert all(v is not None for row in top1["values"] for v in row if names)  # every pair comparable
    i, j = names.index("v4"), names.index("old")
    assert top1["values"][i][j] == pick(report, "v4", "old", "top1")
    ch = report["chain"]["top1"]
    m = ch["matrix"]
    assert m[3][0] == pick(report, "v4", "old", "top1") and m[1][2] == pick(report, "v2", "v3", "top1")
    assert ch["criterion"][3][0] == (m[3][0] > m[0][0]) and ch["criterion"][0][3] is None
    assert ch["AC"] == sum(ch["criterion"][i][j] for i in range(4) for j in range(i)) / 6
    md = (out / "r" / "report.md").read_text()
    mark = "✓" if ch["criterion"][3][0] else "✗"
    assert f"| v4 | {100 * m[3][0]:.2f} {mark} |" in md
    assert "Chain of upgrades: old <- v2 <- v3 <- v4" in md
    assert ("| v4 | bt2 | k=4, C=2.0, influence_weight=10.0, old_weight=5.0, paragon_weight=1.0, scale=1.0 "
            "| 72 | 12 | 16 = bct [0:12] + added [12:16]; self tests all") in md


def test_chain_cross_test_slice_equals_bct_block(chain_run):
    out, _, report, _ = chain_run
    from bctkit.models.store import load_model

    model = load_model(out / "r" / "models" / "v4" / "model.safetensors")
    feats = load_features(out / "r" / "features" / "v4.safetensors")
    old = load_features(out / "r" / "features" / "old.safetensors")
    assert torch.equal(feats.labels, old.labels)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        f, z = model.backbone.forward_train(x)
        h = model.backbone.net(x)
        v_head = torch.nn.functional.normalize(model.backbone.head(torch.relu(h)), dim=1)
        b = model.backbone.O_p(2.0 * torch.nn.functional.normalize(f, dim=1))
        v = torch.cat([v_head, b], dim=1)
        assert torch.allclose(z[:, :12], model.backbone.O_2(v[:, :12]), atol=1e-6)


def test_chain_resume_reuses_every_version(chain_run, tmp_path):
    out, cfg_path, report, _ = chain_run
    logs: list[str] = []
    again = run_pipeline(load_config(cfg_path), out / "r", resume=True, progress=False, log=logs.append)
    assert not any("training on" in line for line in logs)
    assert again["results"] == report["results"]


def test_cli_evaluate_chain_reads_layout_from_feature_files(chain_run, tmp_path):
    out, _, report, _ = chain_run
    feats = out / "r" / "features"
    args = ["evaluate", "--old", str(feats / "old.safetensors"), "--chain", "--out", str(tmp_path / "ev")]
    for name in ("v2", "v3", "v4"):
        args += ["--new", f"{name}={feats / f'{name}.safetensors'}"]
    assert main(args) == 0
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert ev["chain"]["models"] == ["old", "v2", "v3", "v4"]
    for q, g in (("v4", "old"), ("v4", "v2"), ("v3", "old"), ("v4", "v3")):
        assert pick(ev, q, g, "top1") == pick(report, q, g, "top1")
    assert ev["chain"]["top1"] == report["chain"]["top1"]


def test_cli_evaluate_refuses_features_with_no_common_coordinates(tmp_path, capsys):
    """An old 32-d and a new 24-d file without a declared compatible block: the cross tests would be
    empty, so evaluate refuses instead of writing a report without them."""
    from bctkit.features import FeatureSet

    labels = torch.arange(6).repeat_interleave(3)
    FeatureSet(torch.randn(18, 32), labels, {"model": "old"}).save(tmp_path / "old.safetensors")
    FeatureSet(torch.randn(18, 24), labels, {"model": "new"}).save(tmp_path / "new.safetensors")
    old = str(tmp_path / "old.safetensors")
    code = main(["evaluate", "--old", old, "--new", str(tmp_path / "new.safetensors"),
                 "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 2 and "24-d features cannot be compared with the 32-d features" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ev").exists()
    FeatureSet(torch.randn(18, 40), labels, {"model": "new", "compat_prefixes": [32]}).save(
        tmp_path / "wide.safetensors")
    assert main(["evaluate", "--old", old, "--new", str(tmp_path / "wide.safetensors"), "--fars", "0.1",
                 "--no-backfill", "--out", str(tmp_path / "ev2")]) == 0


def test_config_differences_ignore_options_that_do_not_change_results():
    from bctkit.run.config import load_config, packaged_config
    from bctkit.run.keys import config_differences

    cfg = load_config(packaged_config("synthetic-quick"))
    stored = cfg.model_dump(mode="json")
    same = load_config(packaged_config("synthetic-quick"),
                       ["new.train.checkpoint_every=5", "new.train.device=cpu"])
    assert config_differences(stored, same) == []
    other = load_config(packaged_config("synthetic-quick"), ["new.train.epochs=3", "allocation.ratio=0.5"])
    assert config_differences(stored, other) == ["allocation.ratio", "new.train.epochs"]


def test_cli_demo_is_one_allocation_with_every_method_and_full_is_five(monkeypatch, tmp_path, capsys):
    import bctkit.run.launch as pipeline

    seen: dict = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg, out, **kw: seen.update(
        one=(cfg.allocation.scenario, [m.display_name for m in cfg.methods], cfg.data.glyphs.num_classes)
    ) or {"results": []})
    monkeypatch.setattr(pipeline, "run_scenarios", lambda cfg, out, scenarios, **kw: seen.update(
        full=(list(scenarios), cfg.data.glyphs.num_classes)) or {})
    assert main(["demo", "--out", str(tmp_path / "d"), "--quiet"]) == 0
    assert seen["one"] == ("extended-data", ["l2", "bct", "unibct-avg", "unibct", "mixbct", "bt2"], 500)
    assert main(["demo", "--full", "--out", str(tmp_path / "f"), "--quiet"]) == 0
    assert seen["full"] == (["extended-data", "open-data", "extended-class", "open-class", "identical-data"],
                            1000)
    assert main(["demo", "--full", "--quick", "--out", str(tmp_path / "x")]) == 2
    assert "--full and --quick conflict" in capsys.readouterr().err
