"""The ``ijbb`` / ``ijbc`` protocols: IJB-B and IJB-C template tests over insightface's files
(:class:`~bctkit.data.sources.ijb.IJBSource` reads them; its image i is row i of the features).

Template features, separately for the query model's and the gallery model's image features:
optionally each image feature times its face detector score (``score_weighting``, what
insightface's IJB scripts do by default), then the images of one media are averaged, the media of a
template summed and the sum L2-normalised: the rule of
:func:`~bctkit.evaluation.templates.template_features`, applied as one sparse map (:func:`pooling_matrix`).

- 1:1 verification over the listed template pairs only (15,658,489 for IJB-C, 8,010,270 for
  IJB-B), never through a template x template matrix (:func:`listed_pair_scores`): the first
  template of a pair by the query model, the second by the gallery model. TAR@FAR (``tar_mode``:
  exact by default, or insightface's nearest ROC point), ROC AUC, ROC curve.
- 1:N identification, when the 1:N files are present: probe templates (query model) search gallery
  G1 and, separately, gallery G2 (gallery model; IJB-B's S1 / S2). Closed-set CMC top-k over the
  probes whose subject is enrolled in that gallery, and open-set TPIR@FPIR (NIST rule: probes of
  subjects not enrolled are the non-mated searches); each number is the mean of its G1 and G2 values.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch

from bctkit.data.sources.ijb import DATASETS, IJBSource, Pairs, read_pairs
from bctkit.errors import DataError
from bctkit.evaluation.identification import cmc, tpir_at_fpir
from bctkit.evaluation.protocols.base import PairResult, Protocol, rate_name
from bctkit.evaluation.protocols.split import CMC_CURVE_RANKS
from bctkit.evaluation.templates import pair_scores
from bctkit.evaluation.verification import TAR_RULES, check_rate, check_tar_mode, roc_curve, tar_at_far

__all__ = ["DEFAULT_FARS", "DEFAULT_FPIRS", "DEFAULT_TOPK", "IJBProtocol", "PairPlan", "listed_pair_scores",
           "plan_pairs", "pool_templates", "pooling_matrix", "thin_roc"]

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_FPIRS = (1e-2, 1e-1)
DEFAULT_TOPK = (1, 5, 10)
PAIR_BLOCK_BYTES = 64 << 20
"""Bytes of one block of scores (or, on the gather path, of gathered features per side)."""
GATHER_BELOW_DENSITY = 1 / 256
"""Pair lists covering less of their rows x columns grid than this are scored by gathering."""
ROC_LEVELS = 2000
"""Log-spaced FAR levels in [1e-7, 1] at which the ROC curve kept for plots is sampled."""


def thin_roc(fpr: np.ndarray, tpr: np.ndarray, levels: int = ROC_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """The ROC points to keep for a plot: for each of ``levels`` log-spaced FARs from 1e-7 to 1, the
    curve's last point at or below it, plus the first and last points. Exact points of the curve
    (IJB-C's 15.7M pairs give millions), at most levels + 2."""
    grid = np.logspace(-7, 0, levels)
    keep = np.unique(np.concatenate([[0, len(fpr) - 1], np.searchsorted(fpr, grid, side="right") - 1]))
    keep = keep[keep >= 0]
    return fpr[keep], tpr[keep]


@dataclass(frozen=True)
class PairPlan:
    """A pair list grouped for scoring: ``rows`` / ``cols`` are its distinct first / second template
    indices; ``order`` lists the pairs by their first template, ``row_pos`` is each of them (in that
    order) as a position in ``rows``; ``col_pos[p]`` is pair p's second template as a position in
    ``cols``."""

    rows: np.ndarray
    cols: np.ndarray
    order: np.ndarray
    row_pos: np.ndarray
    col_pos: np.ndarray

    @property
    def density(self) -> float:
        """Listed pairs / (distinct first x distinct second templates)."""
        return len(self.order) / max(1, len(self.rows) * len(self.cols))


def pooling_matrix(templates: np.ndarray, medias: np.ndarray, weights: np.ndarray | None = None
                   ) -> tuple[np.ndarray, torch.Tensor]:
    """(sorted distinct template ids, sparse CSR float64 matrix [templates, images]) whose product
    with image features is each template's sum over its media of the mean (optionally ``weights``-
    weighted) image feature: entry (t, i) = w_i / (images of i's media in template t), the pooling
    of :func:`~bctkit.evaluation.templates.template_features` as one linear map. A media id shared by
    two templates is averaged separately in each."""
    tid, mid = np.asarray(templates).ravel(), np.asarray(medias).ravel()
    if tid.shape != mid.shape or tid.size == 0:
        raise DataError(f"{tid.size} template ids and {mid.size} media ids; expected equal, non-zero counts")
    keys, t_code = np.unique(tid, return_inverse=True)
    _, m_code = np.unique(mid, return_inverse=True)
    _, p_code, counts = np.unique(t_code.astype(np.int64) * (int(m_code.max()) + 1) + m_code,
                                  return_inverse=True, return_counts=True)
    values = 1.0 / counts[p_code]
    if weights is not None:
        values = values * np.asarray(weights, dtype=np.float64).ravel()
    order = np.argsort(t_code, kind="stable")
    crow = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(np.bincount(t_code, minlength=len(keys)), out=crow[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch calls sparse CSR support beta
        matrix = torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(order.astype(np.int64)),
                                         torch.from_numpy(values[order]), size=(len(keys), tid.size),
                                         dtype=torch.float64, check_invariants=True)
    return keys, matrix


def pool_templates(matrix: torch.Tensor, feats: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """L2-normalised ``matrix @ feats`` in float64 (``chunk`` feature columns at a time, so the
    float64 copy stays small), returned as float32."""
    out = torch.empty((matrix.shape[0], feats.shape[1]), dtype=torch.float64)
    for c in range(0, feats.shape[1], chunk):
        out[:, c : c + chunk] = matrix @ feats[:, c : c + chunk].to(torch.float64)
    return torch.nn.functional.normalize(out, dim=1).to(torch.float32)


def _distinct(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, position of each entry among them) of non-negative indices, in O(n)."""
    present = np.zeros(int(idx.max()) + 1 if idx.size else 0, dtype=bool)
    present[idx] = True
    values = np.flatnonzero(present)
    position = np.cumsum(present, dtype=np.int64) - 1
    return values, position[idx].astype(np.int32)


def plan_pairs(first: np.ndarray, second: np.ndarray) -> PairPlan:
    """Group the pairs (``first[p]``, ``second[p]``), row indices of the query / gallery template
    features, for :func:`listed_pair_scores`: linear time (a radix sort for up to 65,535 distinct
    first templates)."""
    first, second = np.asarray(first).ravel(), np.asarray(second).ravel()
    if first.shape != second.shape:
        raise DataError(f"{first.size} first templates but {second.size} second; expected equal")
    for name, x in (("first", first), ("second", second)):
        if x.size and (not np.issubdtype(x.dtype, np.integer) or int(x.min()) < 0):
            raise DataError(f"{name} must hold non-negative integer row indices")
    rows, row_pos = _distinct(first)
    cols, col_pos = _distinct(second)
    key = row_pos.astype(np.uint16) if len(rows) <= np.iinfo(np.uint16).max else row_pos
    order = np.argsort(key, kind="stable")
    return PairPlan(rows, cols, order, row_pos[order], col_pos)


def listed_pair_scores(query: torch.Tensor, gallery: torch.Tensor, plan: PairPlan, method: str = "auto"
                       ) -> np.ndarray:
    """Cosine score of each planned pair: row ``first[p]`` of ``query`` against row ``second[p]`` of
    ``gallery`` (unit rows), float32, in the pair list's order.

    ``matrix``: the distinct first templates, a block of rows at a time, against the distinct second
    templates, one matrix product per block of at most :data:`PAIR_BLOCK_BYTES` of scores, and the
    listed entries picked from it. ``gather``: :func:`~bctkit.evaluation.templates.pair_scores`, two
    feature rows gathered per pair. ``auto`` gathers only when the list is sparser than
    :data:`GATHER_BELOW_DENSITY` of its grid (a product costs a few ns per grid cell, a gathered pair
    a few microseconds at 512-d). Neither ever holds a templates x templates matrix.
    """
    if method not in ("auto", "matrix", "gather"):
        raise DataError(f"pair scoring method {method!r} is unknown; expected auto, matrix or gather")
    n, d = len(plan.order), query.shape[1]
    if method == "gather" or (method == "auto" and plan.density < GATHER_BELOW_DENSITY):
        first = np.empty(n, dtype=np.int64)
        first[plan.order] = plan.rows[plan.row_pos]
        return pair_scores(query, gallery, first, plan.cols[plan.col_pos],
                           block=max(1, PAIR_BLOCK_BYTES // (4 * d)))
    out = np.empty(n, dtype=np.float32)
    cols = gallery[torch.as_tensor(plan.cols)].T.contiguous()
    step = max(1, PAIR_BLOCK_BYTES // (4 * len(plan.cols)))
    bounds = np.searchsorted(plan.row_pos, np.arange(0, len(plan.rows) + step, step))
    for k in range(len(bounds) - 1):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        if lo == hi:
            continue
        block = (query[torch.as_tensor(plan.rows[k * step : (k + 1) * step])] @ cols).numpy()
        idx = plan.order[lo:hi]
        out[idx] = block[plan.row_pos[lo:hi] - k * step, plan.col_pos[idx]]
    return out


class IJBProtocol(Protocol):
    """IJB-B / IJB-C 1:1 and 1:N tests (module docstring). ``name`` is ``ijbb`` or ``ijbc``, set from
    the source; ``source`` holds the images to embed, in the features' row order."""

    name: ClassVar[str] = "ijb"

    def __init__(self, source: IJBSource, pairs: Pairs | None = None, fars: Sequence[float] = DEFAULT_FARS,
                 fpirs: Sequence[float] = DEFAULT_FPIRS, topk: Sequence[int] = DEFAULT_TOPK,
                 score_weighting: bool = False, tar_mode: str = "exact") -> None:
        self.source = source
        self.name = source.dataset  # type: ignore[misc]
        self.dataset = source.name
        self.pairs = read_pairs(source) if pairs is None else pairs
        for far in fars:
            check_rate(far, "FAR")
        for fpir in fpirs:
            check_rate(fpir, "FPIR")
        self.fars = tuple(float(f) for f in fars)
        self.fpirs = tuple(float(f) for f in fpirs)
        self.topk = tuple(int(k) for k in topk)
        if any(k < 1 for k in self.topk):
            raise DataError(f"top-k values must be >= 1, got {list(self.topk)}")
        self.score_weighting = bool(score_weighting)
        self.tar_mode = check_tar_mode(tar_mode)
        self._one_n = self._one_n_rows()

    @classmethod
    def from_root(cls, root: str | os.PathLike[str], name: str = "ijbc", fars: Sequence[float] = DEFAULT_FARS,
                  fpirs: Sequence[float] = DEFAULT_FPIRS, topk: Sequence[int] = DEFAULT_TOPK,
                  score_weighting: bool = False, tar_mode: str = "exact") -> IJBProtocol:
        """The protocol of the IJB dataset ``name`` (``ijbb`` / ``ijbc``) under ``root`` (insightface's
        layout): reads and checks the metadata, decodes no image."""
        if name not in DATASETS:
            raise DataError(f"IJB name {name!r} is unknown; expected one of {sorted(DATASETS)}")
        return cls(IJBSource(root, name), fars=fars, fpirs=fpirs, topk=topk, score_weighting=score_weighting,
                   tar_mode=tar_mode)

    def _one_n_rows(self) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        """Per role (G1, G2, probe): (row in the sorted template ids, subject id) of its templates."""
        lists = self.source.one_n
        if lists is None:
            return None
        out = {role: (np.searchsorted(self.source.template_ids, t.templates), t.subjects)
               for role, t in lists.items()}
        for role in ("G1", "G2"):
            size = len(out[role][0])
            if self.topk and max(self.topk) > size:
                raise DataError(f"top-k {max(self.topk)} exceeds gallery {role} of {size} templates "
                                f"({lists[role].file.name}): top-{max(self.topk)} would be 100 %")
        return out

    @cached_property
    def pair_plan(self) -> PairPlan:
        """The 1:1 pairs grouped for :func:`listed_pair_scores` (made once, on first use)."""
        return plan_pairs(self.pairs.first, self.pairs.second)

    @cached_property
    def pooling(self) -> torch.Tensor:
        """The source's :func:`pooling_matrix` (detector-score weighted when ``score_weighting``)."""
        src = self.source
        keys, matrix = pooling_matrix(src.templates, src.medias, src.scores if self.score_weighting else None)
        assert np.array_equal(keys, src.template_ids)
        return matrix

    def template_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Unit template features [templates, d] float32, row t = the source's ``template_ids[t]``."""
        f = torch.as_tensor(feats)
        if f.ndim != 2 or f.shape[0] != len(self.source):
            raise DataError(f"{self.dataset}: features of shape {list(f.shape)}, expected "
                            f"[{len(self.source)}, d] (one row per image of {self.source.tid_file.name})")
        if not bool(torch.isfinite(f).all()):
            raise DataError(f"{self.dataset}: features contain NaN or Inf; expected finite embeddings")
        return pool_templates(self.pooling, f)

    def _pooling(self) -> str:
        weights = "detector-score-weighted " if self.score_weighting else ""
        return f"template = sum over media of the mean {weights}image feature, L2-normalised"

    def _verification(self, tq: torch.Tensor, tg: torch.Tensor, dims: str
                      ) -> tuple[list[dict[str, Any]], tuple[np.ndarray, np.ndarray]]:
        p = self.pairs
        scores = listed_pair_scores(tq, tg, self.pair_plan)
        n, n_gen = len(scores), int(p.genuine.sum())
        desc = (f"1:1 verification, {self.dataset}: the {n} listed template pairs ({n_gen} genuine, "
                f"{n - n_gen} impostor) of {p.file.name}, first template by query model; {self._pooling()}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tars = tar_at_far(scores, p.genuine, self.fars, mode=self.tar_mode)
        records = [{"metric": rate_name("tar@far", far), "value": v, "n": n,
                    "protocol": f"{desc}; {TAR_RULES[self.tar_mode]}; {dims}"} for far, v in tars.items()]
        # one ROC for both: dropping collinear points leaves the trapezoid area (roc_auc's) unchanged
        fpr, tpr, _ = roc_curve(scores, p.genuine)
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)
        records.append({"metric": "auc", "value": auc, "n": n, "protocol": f"{desc}; ROC AUC; {dims}"})
        return records, thin_roc(fpr, tpr)

    def _identification(self, tq: torch.Tensor, tg: torch.Tensor, dims: str, hits: list[torch.Tensor]
                        ) -> tuple[list[dict[str, Any]], dict[int, float]]:
        assert self._one_n is not None
        p_rows, p_ids = self._one_n["probe"]
        probes = tq[torch.as_tensor(p_rows)]
        sizes = {role: len(self._one_n[role][0]) for role in ("G1", "G2")}
        ranks = sorted(set(self.topk) | {k for k in CMC_CURVE_RANKS if k <= min(sizes.values())})
        curves, tpirs, mated = [], [], []
        for role in ("G1", "G2"):
            g_rows, g_ids = self._one_n[role]
            gallery = tg[torch.as_tensor(g_rows)]
            mated.append(int(np.isin(p_ids, g_ids).sum()))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                curves.append(cmc(probes, p_ids, gallery, g_ids, ks=ranks, hits_out=hits))
            if self.fpirs:
                tpirs.append(tpir_at_fpir(probes, p_ids, gallery, g_ids, self.fpirs))
        curve = {k: float(np.mean([c[k] for c in curves])) for k in ranks}
        counts = (f"{len(p_rows)} probe templates (query model) search G1 of {sizes['G1']} and G2 of "
                  f"{sizes['G2']} gallery templates (gallery model), {mated[0]} / {mated[1]} of them mated")
        ident = (f"1:N closed-set CMC, {self.dataset}: {counts}; top-k over the mated probes of each "
                 f"gallery, mean of G1 and G2; {self._pooling()}; {dims}")
        records = [{"metric": f"top{k}", "value": curve[k], "n": sum(mated), "protocol": ident}
                   for k in self.topk]
        open_desc = (f"1:N open-set TPIR@FPIR (NIST: mated score strictly above every other subject's and "
                     f"the threshold), {self.dataset}: {counts}; mean of G1 and G2; {self._pooling()}; "
                     f"{dims}")
        records += [{"metric": rate_name("tpir@fpir", f), "value": float(np.mean([t[f] for t in tpirs])),
                     "n": len(p_rows), "protocol": open_desc} for f in self.fpirs]
        return records, curve

    def evaluate_pair(self, query: torch.Tensor, gallery: torch.Tensor, dims: str) -> PairResult:
        tq = self.template_features(query)
        tg = tq if gallery is query else self.template_features(gallery)
        result = PairResult([])
        result.records, result.roc = self._verification(tq, tg, dims)
        if self._one_n is not None:
            hits: list[torch.Tensor] = []  # G1's mated probes, then G2's
            records, result.cmc = self._identification(tq, tg, dims, hits)
            result.records += records
            result.top1_hits = torch.cat(hits) if len(hits) == 2 else None
        return result

    @property
    def headline(self) -> tuple[str, ...]:
        """1:1 TAR@FAR=1e-4 (what IJB-B/C results are quoted by), then top-1 of the 1:N search."""
        return ("tar@far=1e-4", "top1", "tar@far=1e-3")

    def describe(self) -> dict[str, Any]:
        src, p = self.source, self.pairs
        out: dict[str, Any] = {
            "protocol": self.name, "dataset": self.dataset, "images": len(src),
            "templates": len(src.template_ids), "media": len(np.unique(src.medias)), "pairs": len(p.genuine),
            "genuine_pairs": int(p.genuine.sum()), "impostor_pairs": int((~p.genuine).sum()),
            "alignment": "5-point similarity to the ArcFace 112x112 template",
            "score_weighting": self.score_weighting, "fars": list(self.fars), "tar_mode": self.tar_mode}
        if self._one_n is not None:
            out.update({f"{role.lower()}_templates": len(self._one_n[role][0]) for role in ("G1", "G2")})
            out["probe_templates"] = len(self._one_n["probe"][0])
            out.update({"fpirs": list(self.fpirs), "topk": list(self.topk)})
        return out
