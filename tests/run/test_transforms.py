"""A run's transformations end to end on a tiny config: h(old) as a gallery model, its certificate
against the old self test, its backfill curves (the uncertainty order against an independent
computation), reuse on resume, and the config's refusals."""

import copy

import numpy as np
import pytest
import yaml

from bctkit.errors import ConfigError
from bctkit.evaluation.certificate import verify_certificate
from bctkit.features import load_features
from bctkit.models.store import load_model
from bctkit.models.transformation import composed_fingerprint, load_transformation
from bctkit.run.config import load_config
from bctkit.run.launch import run_pipeline
from tests.run.test_pipeline import TINY, pick

TREE = {**copy.deepcopy(TINY), "methods": [{"method": "l2"}],
        "transforms": [{"name": "h(old)", "inner_dim": 32, "train": {"epochs": 5, "batch_size": 16}}]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tf")
    (out / "c.yaml").write_text(yaml.safe_dump(TREE))
    report = run_pipeline(load_config(out / "c.yaml"), out / "r", progress=False, log=lambda m: None)
    return out, report


def test_h_old_is_the_transformed_old_features_paired_with_its_target(run):
    out, report = run
    h = load_transformation(out / "r" / "models" / "h_old_")
    old = load_features(out / "r" / "features" / "old.safetensors")
    feats = load_features(out / "r" / "features" / "h(old).safetensors")
    y, _ = h.apply(old.feats)
    assert np.array_equal(feats.feats.numpy(), y)
    assert h.meta["target"] == "paragon"  # the default: FCT's independently trained new model
    assert h.old_fingerprint == report["models"]["old"]["fingerprint"]
    assert h.meta["new_fingerprint"] == report["models"]["paragon"]["fingerprint"]
    pairs = {(r["query_model"], r["gallery_model"]) for r in report["results"]}
    with_h = {p for p in pairs if "h(old)" in p}
    assert with_h == {("h(old)", "h(old)"), ("paragon", "h(old)"), ("h(old)", "paragon")}
    assert "h(old)" not in report["compatibility"]


def test_summary_and_certificate_judge_h_against_the_old_self_test(run):
    out, report = run
    t = report["transforms"]["h(old)"]["metrics"]["top1"]
    cross, base, top = (pick(report, "paragon", "h(old)", "top1"), pick(report, "old", "old", "top1"),
                        pick(report, "paragon", "paragon", "top1"))
    assert (t["cross"], t["old_self"], t["target_self"]) == (cross, base, top)
    assert t["criterion"] == (cross > base)
    assert t["recovered"] == pytest.approx((cross - base) / (top - base))
    cert = verify_certificate(out / "r" / "certificates" / "paragon__h_old_.json")
    h = load_transformation(out / "r" / "models" / "h_old_" / "transform.safetensors")
    old_fp = load_model(out / "r" / "models" / "old" / "model.safetensors").fingerprint
    assert cert["gallery"]["fingerprint"] == composed_fingerprint(h.fingerprint, old_fp) == h.version
    assert cert["criterion"]["metric"] == "top1"
    assert (cert["criterion"]["cross"], cert["criterion"]["old_self"]) == (cross, base)
    assert cert["passed"] == (cross > base)
    assert not any(d["gallery"] == "h(old)" for d in report["diagnosis"])
    md = (out / "r" / "report.md").read_text()
    assert "## Transformed gallery (FCT / FastFill)" in md


def _top1(q, g, gl, ql):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    return float(np.mean(gl[np.argmax(q @ g.T, axis=1)] == ql))


def test_uncertainty_order_against_an_independent_computation(run):
    out, report = run
    b = report["backfill"]["h(old)"]
    assert set(b) >= {"random", "benefit", "uncertainty"} and "distance" not in b
    feats = {n: load_features(out / "r" / "features" / f"{n}.safetensors").feats.double().numpy()
             for n in ("old", "paragon", "h(old)")}
    labels = load_features(out / "r" / "features" / "old.safetensors").labels.numpy()
    # the split: the first image of each class is its gallery item (gallery_per_class 1), the rest probes
    first = {}
    for i, lab in enumerate(labels):
        first.setdefault(lab, i)
    g_idx = np.array(sorted(first.values()))
    p_idx = np.array([i for i in range(len(labels)) if i not in set(g_idx)])
    _, log_var = load_transformation(out / "r" / "models" / "h_old_").apply(
        load_features(out / "r" / "features" / "old.safetensors").feats)
    # most uncertain first; sorted is stable, so ties stay in gallery order
    order = sorted(range(len(g_idx)), key=lambda i: -float(log_var[g_idx[i]]))
    for p, value in zip(b["uncertainty"]["fractions"], b["uncertainty"]["values"], strict=True):
        done = set(order[:round(p * len(g_idx))])
        gallery = np.stack([feats["paragon" if i in done else "h(old)"][g] for i, g in enumerate(g_idx)])
        expected = _top1(feats["paragon"][p_idx], gallery, labels[g_idx], labels[p_idx])
        assert value == pytest.approx(expected, abs=1e-12)
    area = np.trapezoid(b["uncertainty"]["values"], b["uncertainty"]["fractions"])
    assert b["uncertainty"]["area"] == pytest.approx(area)


def test_resume_reuses_the_finished_transformation(run):
    out, report = run
    logs = []
    again = run_pipeline(load_config(out / "c.yaml"), out / "r", resume=True, progress=False, log=logs.append)
    assert "[h(old)] reusing finished transformation" in "\n".join(logs)
    assert again["transforms"] == report["transforms"]


@pytest.mark.parametrize(("patch", "message"), [
    ({"target": "bct"}, r"transforms.0: target 'bct' is not a new model of this run; expected one of "
                        r"\['paragon', 'l2'\]"),
    ({"name": "l2"}, r"transforms.0: name 'l2' is reserved or used twice"),
    ({"name": "old"}, r"transforms.0: name 'old' is reserved"),
    ({"side_info": "/nonexistent/side.safetensors"}, "side_info '/nonexistent/side.safetensors': no such"),
    ({"inner_dim": 0}, r"transforms.0.inner_dim"),
])
def test_config_refusals(tmp_path, patch, message):
    tree = copy.deepcopy(TREE)
    tree["transforms"][0].update(patch)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "c.yaml")


def test_flips_in_the_report_and_the_certificate(run):
    out, report = run
    flips = {(f["query_model"], f["gallery_model"]): f for f in report["flips"]}
    base = pick(report, "old", "old", "top1")
    assert ("old", "old") not in flips and ("paragon", "h(old)") in flips
    for (q, g), f in flips.items():  # top-1 (pair) - top-1 (old / old) = positive - negative flips
        gain = f["positive_flip_rate"] - f["negative_flip_rate"]
        assert pick(report, q, g, "top1") - base == pytest.approx(gain)
        assert f["n"] == next(r["n"] for r in report["results"] if r["metric"] == "top1")
    cert = verify_certificate(out / "r" / "certificates" / "paragon__h_old_.json")
    assert cert["flips"] == {k: flips[("paragon", "h(old)")][k] for k in cert["flips"]}
    assert "## Negative flips" in (out / "r" / "report.md").read_text()
    edited = {**cert, "flips": {**cert["flips"], "negative_flip_rate": 1.5}}
    with pytest.raises(Exception, match="hash does not match|flips"):
        verify_certificate(edited)


def test_side_information_from_a_given_model(run, tmp_path):
    """A transformation with side information: the run's old model given as the side model (any
    bctkit model file will do), trained in a copy of the finished run (everything else reused)."""
    import shutil

    out, _ = run
    shutil.copytree(out / "r", tmp_path / "r")
    side = tmp_path / "r" / "models" / "old" / "model.safetensors"
    tree = copy.deepcopy(TREE)
    tree["transforms"].append({"name": "fct-side", "target": "l2", "uncertainty": False, "inner_dim": 16,
                               "side_info": str(side), "train": {"epochs": 2, "batch_size": 16}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    logs = []
    report = run_pipeline(load_config(tmp_path / "c.yaml"), tmp_path / "r", resume=True, progress=False,
                          log=logs.append)
    assert "[h(old)] reusing finished transformation" in "\n".join(logs)
    h = load_transformation(tmp_path / "r" / "models" / "fct-side")
    side_model = load_model(side)
    assert h.config.side_dim == side_model.output_dim and h.meta["side_fingerprint"] == side_model.fingerprint
    assert report["transforms"]["fct-side"]["target"] == "l2"
    # h(old, side) of the test images: the old model's features are the side information here
    old = load_features(tmp_path / "r" / "features" / "old.safetensors")
    y, log_var = h.apply(old.feats, old.feats)
    assert log_var is None
    feats = load_features(tmp_path / "r" / "features" / "fct-side.safetensors")
    np.testing.assert_allclose(feats.feats.numpy(), y, rtol=1e-5, atol=1e-6)
