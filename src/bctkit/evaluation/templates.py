"""IJB-C style template features and blockwise 1:1 pair scoring (evaluation.md, "Features").

Template feature: the image features of one media (video or still) inside a template are averaged,
the media features of the template are summed, and the sum is L2-normalised. A media id shared by
two templates is averaged separately in each template. Pair score = cosine similarity.
"""

from __future__ import annotations

import numpy as np
import torch

from bctkit.errors import DataError
from bctkit.evaluation.search import ArrayLike, as_feature_matrix


def _labels(x: ArrayLike, name: str, n: int) -> np.ndarray:
    a = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x).ravel()
    if a.shape[0] != n:
        raise DataError(f"{name} has {a.shape[0]} entries but feats has {n} rows; expected equal")
    return a


def template_features(
    feats: ArrayLike, template_ids: ArrayLike, media_ids: ArrayLike
) -> tuple[np.ndarray, torch.Tensor]:
    """(sorted unique template ids, template features (n_templates, d) float32, unit rows).

    Row i of the features belongs to template_keys[i]. Images are averaged within each
    (template, media) pair, media features are summed per template, then L2-normalised.
    """
    f = as_feature_matrix(feats, "feats")
    if f.shape[0] == 0:
        raise DataError("feats is empty; expected at least one image feature")
    tid = _labels(template_ids, "template_ids", f.shape[0])
    mid = _labels(media_ids, "media_ids", f.shape[0])
    keys, t_code = np.unique(tid, return_inverse=True)
    _, m_code = np.unique(mid, return_inverse=True)
    pair = t_code.astype(np.int64).ravel() * (int(m_code.max()) + 1) + m_code.astype(np.int64)
    pairs, p_code = np.unique(pair, return_inverse=True)
    p_code = torch.as_tensor(p_code.ravel())
    media_sum = torch.zeros((pairs.shape[0], f.shape[1]), dtype=torch.float64)
    media_sum.index_add_(0, p_code, f.to(torch.float64))
    counts = torch.bincount(p_code, minlength=pairs.shape[0]).to(torch.float64)
    media_mean = media_sum / counts[:, None]
    media_template = torch.as_tensor(pairs // (int(m_code.max()) + 1))
    tmpl = torch.zeros((keys.shape[0], f.shape[1]), dtype=torch.float64)
    tmpl.index_add_(0, media_template, media_mean)
    return keys, torch.nn.functional.normalize(tmpl, dim=1).to(torch.float32)


def index_of(keys: np.ndarray, values: ArrayLike) -> np.ndarray:
    """Row index in sorted unique ``keys`` of each of ``values``; DataError for an unknown value."""
    keys = np.asarray(keys)
    v = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values).ravel()
    pos = np.searchsorted(keys, v)
    pos_c = np.minimum(pos, max(keys.shape[0] - 1, 0))
    if keys.shape[0] == 0 or not np.array_equal(keys[pos_c], v):
        raise DataError("values contain a template id that has no template feature")
    return pos_c.astype(np.int64)


def pair_scores(
    feats_a: ArrayLike,
    feats_b: ArrayLike,
    idx_a: ArrayLike,
    idx_b: ArrayLike,
    block: int = 1_000_000,
) -> np.ndarray:
    """Cosine score of each pair (row idx_a[i] of feats_a, row idx_b[i] of feats_b), float32.

    feats_a and feats_b may come from different models (cross test: new first, old second); they
    must have the same dimension. Pairs are scored ``block`` at a time so memory stays bounded.
    """
    fa = torch.nn.functional.normalize(as_feature_matrix(feats_a, "feats_a"), dim=1)
    fb = torch.nn.functional.normalize(as_feature_matrix(feats_b, "feats_b"), dim=1)
    if fa.shape[1] != fb.shape[1]:
        raise DataError(f"feats_a has dim {fa.shape[1]} but feats_b has dim {fb.shape[1]}; expected equal")
    ia = torch.as_tensor(np.asarray(idx_a).ravel().astype(np.int64))
    ib = torch.as_tensor(np.asarray(idx_b).ravel().astype(np.int64))
    if ia.shape != ib.shape:
        raise DataError(f"idx_a ({ia.shape[0]}) and idx_b ({ib.shape[0]}) differ in length")
    for idx, f, name in ((ia, fa, "idx_a"), (ib, fb, "idx_b")):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= f.shape[0]):
            raise DataError(f"{name} has an index outside [0, {f.shape[0]})")
    if block < 1:
        raise DataError(f"block must be >= 1, got {block}")
    out = torch.empty(ia.shape[0], dtype=torch.float32)
    for s in range(0, ia.shape[0], block):
        out[s : s + block] = (fa[ia[s : s + block]] * fb[ib[s : s + block]]).sum(1)
    return out.numpy()
