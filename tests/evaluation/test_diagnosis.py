"""The diagnosis of failed or nearly failed claims: hubness counted by hand on a collapsed case, the
cosines against numpy loops, the rules' order, and the report.md / report.json section."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bctkit.evaluation.diagnosis import (
    NEAR_MARGIN,
    TrainFeatures,
    cause,
    diagnose,
    flagged,
    markdown_lines,
    mean_direction_cosine,
    measure,
    same_class_cosine,
    same_image_cosine,
)
from bctkit.evaluation.protocols import EvalProtocol
from bctkit.evaluation.suite import evaluate_suite, models_info_from_features
from bctkit.features import FeatureSet

CLASSES, PER_CLASS, DIM = 5, 3, 6
LABELS = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
PROTOCOL = EvalProtocol("syn", LABELS, 1, (0.1,), (1,))


def _old() -> torch.Tensor:
    """Image j of class c: e_c + 0.1 j e_5, except the gallery image (j = 0) of class 2, which is
    (1, 1, 1, 1, 1, 0): the item nearest to the old features' mean direction."""
    x = torch.zeros(CLASSES * PER_CLASS, DIM)
    for i, (c, j) in enumerate((c, j) for c in range(CLASSES) for j in range(PER_CLASS)):
        x[i, c] = 1.0
        x[i, 5] = 0.1 * j
    x[2 * PER_CLASS, :5] = 1.0
    return x


def _collapsed() -> dict[str, FeatureSet]:
    """Every new feature is the old features' mean direction: all cross queries find one item."""
    old = _old()
    u = torch.nn.functional.normalize(torch.nn.functional.normalize(old, dim=1).sum(0), dim=0)
    new = u.repeat(len(LABELS), 1)
    return {"old": FeatureSet(old, LABELS, {"model_fingerprint": "fp-old"}),
            "bct": FeatureSet(new, LABELS, {"model_fingerprint": "fp-bct", "method": "bct",
                                            "params": {"weight": 1.0}})}


def _report(passed: bool, cross: float, old_self: float) -> dict:
    return {"certificate_results": [{"query": "bct", "gallery": "old", "metric": "top1", "cross": cross,
                                     "old_self": old_self, "passed": passed}],
            "models": {"old": {"method": None}, "bct": {"method": "bct", "params": {"weight": 1.0}}},
            "config": {"methods": [{"method": "l2", "name": "other", "params": {}, "train": None},
                                   {"method": "bct", "name": None, "params": {}, "train": None}]}}


def test_hubness_of_a_collapsed_case_counted_by_hand():
    f = _collapsed()
    hub = measure(f["bct"], f["old"], PROTOCOL, None)["hubness"]
    # 5 gallery items (rows 0, 3, 6, 9, 12), 10 probes; the top 1 % of 5 items is 1 item
    assert hub["cross"] == {"queries": 10, "gallery_items": 5, "top_items": 1, "top_share": 1.0,
                            "max_share": 1.0, "max_item": {"position": 2, "row": 6, "label": 2},
                            "distinct": 1}
    # the old model's own probes each find their class's item: 2 of 10 each
    assert hub["old_self"]["top_share"] == 0.2 and hub["old_self"]["max_share"] == 0.2
    assert hub["old_self"]["distinct"] == 5 and hub["old_self"]["max_item"]["position"] == 0


def test_collapsed_case_gets_the_collapse_sentence():
    f = _collapsed()
    [d] = diagnose(_report(False, 0.2, 1.0), f, PROTOCOL)
    assert d["status"] == "failed" and d["cause"] == "collapse"
    assert d["test"]["new_to_old_mean"] == pytest.approx(1.0, abs=1e-6)
    # the option paths name the method's index in the config (bct is methods.1)
    assert "lower methods.1.params.weight" in d["advice"]
    assert "new.train.schedule.warmup_epochs" in d["advice"] and "new.train.grad_clip" in d["advice"]
    assert d["train"] is None
    md = "\n".join(markdown_lines([d]))
    assert "## Diagnosis" in md and "**Likely cause (collapse)**" in md
    assert "take 100.00 % of 10 top-1 results" in md and "evaluation row 6, class 2" in md
    assert "Training images: not compared" in md


def test_near_rule():
    assert flagged(_report(True, 0.80, 0.80 - NEAR_MARGIN / 2))[0]["status"] == "near"
    assert flagged(_report(True, 0.80, 0.80 - 2 * NEAR_MARGIN)) == []
    assert flagged(_report(False, 0.5, 0.8))[0]["status"] == "failed"


def _loop_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_cosines_against_loops():
    rng = np.random.default_rng(3)
    new, old = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 0.5
    labels = rng.integers(0, 6, size=40)
    same = sum(_loop_cosine(new[i], old[i]) for i in range(40)) / 40
    assert same_image_cosine(torch.tensor(new), torch.tensor(old)) == pytest.approx(same, abs=1e-6)
    mean = sum(old[i] / np.linalg.norm(old[i]) for i in range(40))
    to_mean = sum(_loop_cosine(new[i], mean) for i in range(40)) / 40
    assert mean_direction_cosine(torch.tensor(new), torch.tensor(old)) == pytest.approx(to_mean, abs=1e-6)
    pairs = [_loop_cosine(old[i], old[j]) for i in range(40) for j in range(40)
             if i != j and labels[i] == labels[j]]
    assert same_class_cosine(torch.tensor(old), labels) == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    assert math.isnan(same_class_cosine(torch.tensor(old[:3]), np.arange(3)))


def test_training_cosines_split_by_known_classes():
    rng = np.random.default_rng(4)
    new, old = rng.normal(size=(30, DIM)), rng.normal(size=(30, DIM))
    known = np.arange(30) < 12
    f = _collapsed()
    train = TrainFeatures(torch.tensor(new, dtype=torch.float32), torch.tensor(old, dtype=torch.float32),
                          known, "a sample")
    tr = measure(f["bct"], f["old"], None, train)["train"]
    for key, rows in (("known", range(12)), ("unseen", range(12, 30))):
        assert tr[f"{key}_images"] == len(rows)
        expect = sum(_loop_cosine(new[i], old[i]) for i in rows) / len(rows)
        assert tr[key] == pytest.approx(expect, abs=1e-6)
    assert tr["images"] == 30 and tr["note"] == "a sample"
    [d] = diagnose(_report(False, 0.2, 1.0), f, None,
                   lambda q, g: train if (q, g) == ("bct", "old") else None)
    assert d["hubness"] is None and d["train"] == tr  # no gallery split: no hubness
    md = "\n".join(markdown_lines([d]))
    assert "Hubness" not in md and "training images (30, a sample)" in md
    assert f"classes the old classifier knew {tr['known']:.3f} (12 images)" in md
    few = TrainFeatures(train.new, train.old, np.arange(30) < 5)
    assert measure(f["bct"], f["old"], None, few)["train"]["known"] is None  # 5 < MIN_GROUP images


def _numbers(same=0.9, same_class=0.5, new_mean=0.3, old_mean=0.3, known=None, unseen=None,
             top_share=0.1, old_top=0.1) -> dict:
    train = None if known is None else {"known": known, "unseen": unseen}
    return {"test": {"same_image": same, "old_same_class": same_class, "new_to_old_mean": new_mean,
                     "old_to_old_mean": old_mean},
            "train": train,
            "hubness": {"cross": {"top_share": top_share, "top_items": 1},
                        "old_self": {"top_share": old_top}}}


@pytest.mark.parametrize(("numbers", "expected"), [
    (_numbers(new_mean=0.61, old_mean=0.4, same=0.1), "collapse"),  # collapse comes first
    (_numbers(new_mean=0.49, old_mean=0.4, known=0.8, unseen=0.6, same=0.1), "unseen"),
    (_numbers(known=0.8, unseen=0.75, same=0.4), "drift"),
    (_numbers(top_share=0.3, old_top=0.1), "hubs"),
    (_numbers(top_share=0.3, old_top=0.2), "unclear"),  # hubs no worse than the old model's own
    (_numbers(top_share=0.2, old_top=0.05), "unclear"),  # below the 25 % floor
])
def test_rules_in_order(numbers, expected):
    paths = ("methods.0", "new.train", "methods.0.params.weight")
    assert cause(numbers, "l2", paths)[0] == expected
    assert cause(numbers, "independent", paths)[0] == "independent"


def test_report_has_a_section_only_for_a_failed_or_near_claim(tmp_path):
    f = _collapsed()
    report = evaluate_suite(f, PROTOCOL, tmp_path / "bad", models_info_from_features(f), backfill=False)
    assert [d["cause"] for d in report["diagnosis"]] == ["collapse"]
    on_disk = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert on_disk["diagnosis"][0]["hubness"]["cross"]["max_share"] == 1.0
    assert "## Diagnosis" in (tmp_path / "bad" / "report.md").read_text()
    old = _old()
    # a better new model: every probe exactly on its class's direction (old self 80 %: class 2's
    # gallery item is off-axis, and old probes of class 4 are moved to class 3)
    old[4 * PER_CLASS + 1:5 * PER_CLASS, 3] = 2.0
    new = torch.nn.functional.one_hot(LABELS, DIM).float()
    new[2 * PER_CLASS + 1:3 * PER_CLASS] = old[2 * PER_CLASS]
    healthy = {"old": FeatureSet(old, LABELS, {}), "l2": FeatureSet(new, LABELS, {})}
    report = evaluate_suite(healthy, PROTOCOL, tmp_path / "ok", models_info_from_features(healthy),
                            backfill=False)
    [cert] = report["certificate_results"]
    assert cert["passed"] and cert["cross"] - cert["old_self"] >= NEAR_MARGIN
    assert report["diagnosis"] == []
    assert "Diagnosis" not in (tmp_path / "ok" / "report.md").read_text()
