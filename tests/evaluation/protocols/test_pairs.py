"""PairsProtocol: every number against a plain-Python recomputation (folds from sklearn's KFold, a
loop over pairs and thresholds), hand-worked tie and boundary cases, and the fold split rule."""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from sklearn.model_selection import KFold

from bctkit.data.sources.pairbin import PairBinSource
from bctkit.errors import DataError
from bctkit.evaluation.protocols.pairs import (
    PairsProtocol,
    fold_slices,
    insightface_thresholds,
    kfold_accuracy,
)

THRESHOLDS = [i * 0.01 for i in range(400)]


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v] if norm > 0 else list(v)


def reference_pairs(query: torch.Tensor, gallery: torch.Tensor) -> tuple[list[float], list[float]]:
    """(squared distance, cosine) of pair p = query row 2p vs gallery row 2p + 1, in plain Python."""
    dist, cos = [], []
    for p in range(query.shape[0] // 2):
        a, b = unit(query[2 * p].tolist()), unit(gallery[2 * p + 1].tolist())
        dist.append(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))
        cos.append(sum(x * y for x, y in zip(a, b, strict=True)))
    return dist, cos


def reference_accuracy(dist: list[float], issame: list[bool], folds: int) -> list[float]:
    """Per-fold accuracy: folds from sklearn's unshuffled KFold, every threshold tried in a loop, the
    first one reaching the most correct training decisions kept (strict improvement only)."""
    index = list(range(len(dist)))
    splits = KFold(n_splits=folds, shuffle=False).split(index) if folds > 1 else [(index, index)]
    accs = []
    for train, test in splits:
        best_t, best = None, -1
        for t in THRESHOLDS:
            correct = sum(1 for i in train if (dist[i] < t) == issame[i])
            if correct > best:
                best_t, best = t, correct
        accs.append(sum(1 for i in test if (dist[i] < best_t) == issame[i]) / len(test))
    return accs


def reference_tar(cos: list[float], issame: list[bool], per: int, of: int) -> float:
    """Exact TAR at FAR = per / of: threshold = the (k + 1)-th largest impostor score, k = floor(FAR *
    N_imp) in integers; NaN when k = 0."""
    imp = sorted((c for c, s in zip(cos, issame, strict=True) if not s), reverse=True)
    gen = [c for c, s in zip(cos, issame, strict=True) if s]
    k = len(imp) * per // of
    if k == 0:
        return math.nan
    t = imp[k] if k < len(imp) else -math.inf
    return sum(1 for g in gen if g > t) / len(gen)


def pair_features(pairs: int, genuine: int, dim: int = 16, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Query and gallery features over 2 * pairs rows: genuine pairs' second gallery row is a noisy
    copy of the first query row; every other row is unrelated, so the cross convention matters."""
    rng = np.random.default_rng(seed)
    issame = np.zeros(pairs, dtype=bool)
    issame[rng.choice(pairs, genuine, replace=False)] = True
    query = rng.normal(size=(2 * pairs, dim))
    gallery = rng.normal(size=(2 * pairs, dim))
    for p in np.flatnonzero(issame):
        gallery[2 * p + 1] = query[2 * p] + rng.normal(scale=1.2, size=dim)
    return torch.tensor(query, dtype=torch.float32), torch.tensor(gallery, dtype=torch.float32), issame


def test_thresholds_are_insightface_arange() -> None:
    assert insightface_thresholds().tolist() == THRESHOLDS


def test_fold_split_matches_kfold() -> None:
    for n in (23, 10, 6000, 7001, 209):
        sk = [(int(test[0]), int(test[-1]) + 1) for _, test in KFold(n_splits=10).split(np.arange(n))]
        assert [(s.start, s.stop) for s in fold_slices(n, 10)] == sk
    # the first n % 10 folds hold one extra pair
    assert [s.stop - s.start for s in fold_slices(23, 10)] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert [s.stop - s.start for s in fold_slices(6000, 10)] == [600] * 10
    with pytest.raises(DataError, match="at least 10 pairs"):
        fold_slices(9, 10)


def test_tie_takes_first_best_threshold() -> None:
    # fold 1 (pairs 2, 3): genuine at 0.5, impostor at 1.5 -> every threshold 0.51 ... 1.50 is perfect;
    # the first, 0.51, is chosen for fold 0, where the genuine pair at 1.0 is then rejected.
    # fold 0 (pairs 0, 1): genuine at 1.0, impostor at 2.0 -> 1.01 first perfect, fold 1 then perfect.
    acc, thr = kfold_accuracy(np.array([1.0, 2.0, 0.5, 1.5]), np.array([True, False, True, False]), folds=2)
    assert thr.tolist() == [0.51, 1.01]
    assert acc.tolist() == [0.5, 1.0]


def test_distance_equal_to_threshold_is_rejected() -> None:
    t50 = insightface_thresholds()[50]
    # training fold (pairs 2, 3): genuine exactly at threshold 0.50 -> accepted only from 0.51 on
    acc, thr = kfold_accuracy(np.array([t50, 3.0, t50, 3.0]), np.array([True, False, True, False]), folds=2)
    assert thr.tolist() == [0.51, 0.51]
    assert acc.tolist() == [1.0, 1.0]
    # a genuine pair at distance 4 (opposite embeddings) is never accepted: best = 0.0, half right
    acc, thr = kfold_accuracy(np.array([4.0, 3.0, 4.0, 3.0]), np.array([True, False, True, False]), folds=2)
    assert thr.tolist() == [0.0, 0.0] and acc.tolist() == [0.5, 0.5]


@pytest.mark.parametrize("pairs, genuine, folds, seed", [(203, 103, 10, 0), (57, 30, 10, 1), (40, 21, 1, 2),
                                                         (64, 30, 5, 3)])
def test_kfold_accuracy_against_loop(pairs: int, genuine: int, folds: int, seed: int) -> None:
    query, gallery, issame = pair_features(pairs, genuine, seed=seed)
    dist, _ = reference_pairs(query, gallery)
    want = reference_accuracy(dist, issame.tolist(), folds)
    acc, _ = kfold_accuracy(np.array(dist), issame, folds)
    assert acc.tolist() == want
    assert 0.6 < np.mean(want) < 1.0  # thresholds matter: neither chance nor perfect


def test_evaluate_pair_every_number() -> None:
    query, gallery, issame = pair_features(203, 103, seed=0)  # 100 impostors; 203 pairs: folds of 21 / 20
    protocol = PairsProtocol(issame, dataset="toy", fars=(1e-4, 1e-2, 0.1))
    res = protocol.evaluate_pair(query, gallery, "all 16 dims")
    rec = {r["metric"]: r for r in res.records}
    assert list(rec) == ["acc10fold", "acc10fold_std", "tar@far=1e-4", "tar@far=1e-2", "tar@far=1e-1", "auc"]
    assert all(r["n"] == 203 and "all 16 dims" in r["protocol"] and "toy" in r["protocol"]
               for r in res.records)
    dist, cos = reference_pairs(query, gallery)
    accs = reference_accuracy(dist, issame.tolist(), 10)
    mean = sum(accs) / len(accs)
    assert rec["acc10fold"]["value"] == pytest.approx(mean, rel=1e-12, abs=0)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))
    assert rec["acc10fold_std"]["value"] == pytest.approx(std, rel=1e-9, abs=1e-15)
    assert math.isnan(rec["tar@far=1e-4"]["value"])  # 1e-4 * 100 impostors < 1: not measurable
    flags = issame.tolist()
    assert rec["tar@far=1e-2"]["value"] == pytest.approx(reference_tar(cos, flags, 1, 100), abs=1e-12)
    assert rec["tar@far=1e-1"]["value"] == pytest.approx(reference_tar(cos, flags, 1, 10), abs=1e-12)
    assert rec["auc"]["value"] == pytest.approx(roc_auc_score(issame, cos), abs=1e-12)
    fpr, tpr, _ = sk_roc_curve(issame, cos)
    np.testing.assert_allclose(res.roc[0], fpr, atol=1e-12)
    np.testing.assert_allclose(res.roc[1], tpr, atol=1e-12)
    # the convention is first row by the query model, second by the gallery model: swapping differs
    swapped = protocol.evaluate_pair(gallery, query, "all 16 dims").records[0]["value"]
    assert swapped < rec["acc10fold"]["value"] - 0.2


def test_zero_embedding_counts_as_distance_one() -> None:
    query = torch.zeros(20, 4)
    gallery = torch.zeros(20, 4)
    gallery[1::2, 0] = 1.0  # second images: unit vectors; first images: zero -> distance 1 for every pair
    issame = np.array([True, False] * 5)
    # fold 0 = pairs 0-4 (3 genuine, 2 impostor), fold 1 = pairs 5-9 (2 genuine, 3 impostor). Trained on
    # fold 1, rejecting all (thresholds 0 ... 1.00, none strictly above 1) wins: fold 0 gets 2 / 5.
    # Trained on fold 0, accepting all (1.01 on) wins: fold 1 gets 2 / 5.
    rec = PairsProtocol(issame, folds=2).evaluate_pair(query, gallery, "d").records[0]
    assert rec["value"] == 0.4


def write_bin(path: Path, issame: list[bool]) -> Path:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(2 * len(issame)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
        images.append(buf.getvalue())
    path.write_bytes(pickle.dumps((images, issame), protocol=4))
    return path


def test_from_file(tmp_path: Path) -> None:
    issame = [True, False, False, True, True, False, True, False, True, False, True, True]
    protocol = PairsProtocol.from_file(write_bin(tmp_path / "agedb_30.bin", issame), fars=(1e-1,), folds=4)
    assert protocol.name == "pairs" and protocol.dataset == "agedb_30" and not protocol.backfill
    assert isinstance(protocol.source, PairBinSource) and len(protocol.source) == 24
    assert protocol.issame.tolist() == issame
    desc = protocol.describe()
    assert desc["pairs"] == 12 and desc["images"] == 24 and desc["genuine"] == 7 and desc["impostor"] == 5
    assert desc["folds"] == 4 and desc["fars"] == [0.1] and desc["file"].endswith("agedb_30.bin")
    assert desc["images_fingerprint"] == protocol.source.fingerprint()
    names = [r["metric"] for r in protocol.evaluate_pair(torch.randn(24, 3), torch.randn(24, 3), "d").records]
    assert names == ["acc4fold", "acc4fold_std", "tar@far=1e-1", "auc"]


def test_bad_input() -> None:
    issame = np.array([True, False] * 10)
    protocol = PairsProtocol(issame)
    with pytest.raises(DataError, match=r"query features have shape \[39, 4\]; expected \[40, d\]"):
        protocol.evaluate_pair(torch.randn(39, 4), torch.randn(40, 4), "d")
    bad = torch.randn(40, 4)
    bad[3, 1] = math.nan
    with pytest.raises(DataError, match="NaN"):
        protocol.evaluate_pair(torch.randn(40, 4), bad, "d")
    with pytest.raises(DataError, match="20 genuine and 0 impostor"):
        PairsProtocol(np.ones(20, dtype=bool))
    with pytest.raises(DataError, match="at least 10 pairs"):
        PairsProtocol(np.array([True, False] * 4))
    with pytest.raises(DataError, match="FAR"):
        PairsProtocol(issame, fars=(0.0,))
    with pytest.raises(DataError, match="bools"):
        PairsProtocol(np.array([1, 0] * 10))
