"""The ``pairs`` protocol: 1:1 verification on a fixed list of image pairs (LFW, CFP-FP, AgeDB-30,
CALFW, CPLFW ... as insightface's ``.bin`` files, read by
:class:`~bctkit.data.sources.pairbin.PairBinSource`).

Pair p is rows 2p (first image, embedded by the query model) and 2p + 1 (second image, embedded by
the gallery model). Reported:

- ``acc10fold`` / ``acc10fold_std``: k-fold verification accuracy (k = 10 by default) as insightface
  computes it. Both embeddings are L2-normalised and the pair's distance is the squared Euclidean
  distance between them; a pair is predicted genuine when its distance is strictly below a threshold
  from 0, 0.01, ..., 3.99 (numpy's ``arange(0, 4, 0.01)``). The pairs are cut, in file order and
  without shuffling, into k contiguous folds, the first ``N % k`` of them one pair longer (sklearn's
  ``KFold(shuffle=False)``). For each fold the threshold with the most correct decisions on the other
  k - 1 folds is chosen, the lowest such threshold on a tie (numpy's argmax), and the fold's accuracy is
  its share of correct decisions at that threshold. Reported: the mean of the k accuracies and their
  population standard deviation (ddof 0). With k = 1 the threshold is chosen on all pairs and tested on
  them.
- ``tar@far=...``: TAR@FAR (:func:`bctkit.evaluation.verification.tar_at_far`, ``tar_mode`` exact by
  default, or insightface's) on the cosine scores of all pairs. Every requested FAR gets a record; in
  exact mode a FAR below 1 / N_imp (1e-4 with LFW's 3,000 impostor pairs) is not measurable and its
  value is NaN, never a number.
- ``auc``: ROC AUC over all pairs; :attr:`PairResult.roc` holds the ROC curve.

insightface's published accuracies use the flip test (each image's feature plus that of its mirror
image, summed before normalisation). That is a property of the features, chosen where they are
extracted (``bctkit extract --flip``), not of this protocol: to compare with published numbers,
extract with flip on.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from bctkit.data.sources.base import DataSource
from bctkit.data.sources.pairbin import PairBinSource
from bctkit.errors import DataError
from bctkit.evaluation.protocols.base import PairResult, Protocol, rate_name
from bctkit.evaluation.verification import (
    TAR_RULES,
    check_rate,
    check_tar_mode,
    roc_auc,
    roc_curve,
    tar_at_far,
)

__all__ = ["DEFAULT_FARS", "PairsProtocol", "fold_slices", "insightface_thresholds", "kfold_accuracy",
           "pair_distances"]

DEFAULT_FARS = (1e-3, 1e-2)
"""FARs measurable on every standard pair set (each has at least 3,000 impostor pairs)."""


def insightface_thresholds() -> np.ndarray:
    """The candidate distance thresholds 0, 0.01, ..., 3.99, exactly as numpy's arange builds them."""
    return np.arange(0, 4, 0.01)


def fold_slices(n: int, folds: int) -> list[slice]:
    """Contiguous unshuffled folds of ``n`` items: the first ``n % folds`` hold ``n // folds + 1``."""
    if folds < 1 or n < folds:
        raise DataError(f"{folds}-fold accuracy needs folds >= 1 and at least {max(folds, 1)} pairs, got {n}")
    sizes = np.full(folds, n // folds, dtype=np.int64)
    sizes[: n % folds] += 1
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends, strict=True)]


def pair_distances(first: torch.Tensor | np.ndarray, second: torch.Tensor | np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(squared Euclidean distance, cosine) of each row pair after L2 normalisation, in float64. A zero
    row stays zero, as sklearn's normalize leaves it."""
    a = np.array(first, dtype=np.float64)
    b = np.array(second, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise DataError(f"pair features must be two [N, d] arrays of one shape, got {list(a.shape)} and "
                        f"{list(b.shape)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError("pair features contain NaN or Inf; expected finite embeddings")
    for x in (a, b):
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        norms[norms == 0] = 1.0
        x /= norms[:, None]
    diff = a - b
    return np.einsum("ij,ij->i", diff, diff), np.einsum("ij,ij->i", a, b)


def kfold_accuracy(dist: np.ndarray, issame: np.ndarray, folds: int = 10,
                   thresholds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy of each fold, the threshold chosen for it): insightface's k-fold rule (module docstring).

    Counts are exact integers: for each fold and threshold, the genuine pairs with distance below it
    and the impostor pairs at or above it, from one sort per fold; a fold's training counts are the
    totals minus its own. The first best threshold wins ties, as numpy's argmax."""
    dist = np.asarray(dist, dtype=np.float64).ravel()
    same = np.asarray(issame, dtype=bool).ravel()
    if dist.shape != same.shape:
        raise DataError(f"{dist.size} distances but {same.size} pair flags")
    thr = insightface_thresholds() if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    parts = fold_slices(dist.size, folds)
    correct = np.empty((len(parts), thr.size), dtype=np.int64)
    for f, part in enumerate(parts):
        d, s = dist[part], same[part]
        gen, imp = np.sort(d[s]), np.sort(d[~s])
        accepted_gen = np.searchsorted(gen, thr, side="left")  # genuine with distance < threshold
        accepted_imp = np.searchsorted(imp, thr, side="left")
        correct[f] = accepted_gen + (imp.size - accepted_imp)
    train = correct.sum(axis=0) - correct if len(parts) > 1 else correct
    best = np.argmax(train, axis=1)
    sizes = np.array([p.stop - p.start for p in parts], dtype=np.float64)
    acc = correct[np.arange(len(parts)), best] / sizes
    return acc, thr[best]


class PairsProtocol(Protocol):
    """1:1 verification on listed pairs (module docstring). ``issame[p]`` says whether pair p (rows
    2p, 2p + 1 of the features) is genuine; ``source`` is the images to embed, when read from a file."""

    name: ClassVar[str] = "pairs"

    def __init__(self, issame: Sequence[bool] | np.ndarray, dataset: str = "pairs",
                 fars: Sequence[float] = DEFAULT_FARS, folds: int = 10, source: DataSource | None = None,
                 path: str | Path | None = None, tar_mode: str = "exact") -> None:
        self.issame = np.asarray(issame)
        if self.issame.ndim != 1 or self.issame.dtype != np.bool_:
            raise DataError(f"{dataset}: pair flags must be a 1-D list of bools, got {self.issame.dtype} "
                            f"of shape {list(self.issame.shape)}")
        self.genuine = int(self.issame.sum())
        self.impostor = len(self.issame) - self.genuine
        if self.genuine == 0 or self.impostor == 0:
            raise DataError(f"{dataset}: {self.genuine} genuine and {self.impostor} impostor pairs; the "
                            "pairs protocol needs at least one of each")
        for far in fars:
            check_rate(far, "FAR")
        fold_slices(len(self.issame), folds)
        self.dataset = dataset
        self.fars = tuple(float(f) for f in fars)
        self.folds = int(folds)
        self.tar_mode = check_tar_mode(tar_mode)
        self.source = source
        self.path = None if path is None else Path(path)

    @classmethod
    def from_file(cls, path: str | Path, fars: Sequence[float] = DEFAULT_FARS, folds: int = 10,
                  tar_mode: str = "exact") -> PairsProtocol:
        """The protocol of an insightface pair ``.bin`` file; ``source`` reads its images."""
        source = PairBinSource(path)
        return cls(source.issame, dataset=Path(path).stem, fars=fars, folds=folds, source=source, path=path,
                   tar_mode=tar_mode)

    @property
    def pairs(self) -> int:
        return len(self.issame)

    @property
    def headline(self) -> tuple[str, ...]:
        """The k-fold accuracy (what pair sets are reported by), then TAR@FAR=1e-3."""
        return (f"acc{self.folds}fold", "tar@far=1e-3")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "protocol": self.name, "dataset": self.dataset, "pairs": self.pairs, "images": 2 * self.pairs,
            "genuine": self.genuine, "impostor": self.impostor, "folds": self.folds, "fars": list(self.fars),
            "tar_mode": self.tar_mode,
            "accuracy": "insightface k-fold: unshuffled contiguous folds, squared L2 distance of normalised "
                        "embeddings, threshold from arange(0, 4, 0.01) best on the other folds (first best), "
                        "genuine when distance < threshold; mean and population std over folds"}
        if self.path is not None:
            out["file"] = str(self.path)
        if self.source is not None:
            out["images_fingerprint"] = self.source.fingerprint()
        return out

    def _check_rows(self, feats: torch.Tensor, side: str) -> None:
        if feats.ndim != 2 or feats.shape[0] != 2 * self.pairs:
            raise DataError(f"{self.dataset}: {side} features have shape {list(feats.shape)}; expected "
                            f"[{2 * self.pairs}, d] (two rows per pair, {self.pairs} pairs)")

    def evaluate_pair(self, query: torch.Tensor, gallery: torch.Tensor, dims: str) -> PairResult:
        self._check_rows(query, "query")
        self._check_rows(gallery, "gallery")
        first = query[0::2].detach().cpu().double().numpy()
        second = gallery[1::2].detach().cpu().double().numpy()
        dist, scores = pair_distances(first, second)
        acc, _ = kfold_accuracy(dist, self.issame, self.folds)
        base = (f"1:1 verification, {self.dataset}: {self.pairs} listed pairs ({self.genuine} genuine, "
                f"{self.impostor} impostor), first image by query model")
        acc_desc = (f"{base}; insightface {self.folds}-fold accuracy (unshuffled contiguous folds; squared "
                    "L2 distance of normalised embeddings < threshold, threshold from arange(0, 4, 0.01) "
                    "with most correct decisions on the other folds, first best)")
        n = self.pairs
        name = f"acc{self.folds}fold"
        records: list[dict[str, Any]] = [
            {"metric": name, "value": float(np.mean(acc)), "n": n,
             "protocol": f"{acc_desc}; mean over folds; {dims}"},
            {"metric": f"{name}_std", "value": float(np.std(acc)), "n": n,
             "protocol": f"{acc_desc}; population std (ddof 0) over folds; {dims}"},
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tars = tar_at_far(scores, self.issame, self.fars, mode=self.tar_mode)
        nan_rule = " (NaN below 1/N_imp)" if self.tar_mode == "exact" else ""
        records += [{"metric": rate_name("tar@far", far), "value": v, "n": n,
                     "protocol": f"{base}; {TAR_RULES[self.tar_mode]} over all pairs{nan_rule}; {dims}"}
                    for far, v in tars.items()]
        records.append({"metric": "auc", "value": roc_auc(scores, self.issame), "n": n,
                        "protocol": f"{base}; ROC AUC over all pairs; {dims}"})
        fpr, tpr, _ = roc_curve(scores, self.issame)
        return PairResult(records, roc=(fpr, tpr))
