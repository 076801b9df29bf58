"""1:N identification metrics (evaluation.md, "1:N identification")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bctkit.errors import DataError


def cmc(
    query_feats: torch.Tensor,
    query_ids: torch.Tensor,
    gallery_feats: torch.Tensor,
    gallery_ids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, float]:
    """Closed-set CMC: fraction of probes whose identity is among the top-k gallery items (cosine)."""
    q = torch.nn.functional.normalize(torch.as_tensor(query_feats, dtype=torch.float32), dim=1)
    g = torch.nn.functional.normalize(torch.as_tensor(gallery_feats, dtype=torch.float32), dim=1)
    qid = torch.as_tensor(query_ids)
    gid = torch.as_tensor(gallery_ids)
    if g.shape[0] == 0:
        raise DataError("gallery is empty")
    if q.shape[1] != g.shape[1]:
        raise DataError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}")
    keep = torch.isin(qid, gid)
    q, qid = q[keep], qid[keep]
    kmax = min(max(ks), g.shape[0])
    top = (q @ g.T).topk(kmax, dim=1).indices
    hit = gid[top] == qid[:, None]
    first = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(qid, kmax))
    return {k: float((first < k).float().mean()) if len(qid) else float(np.nan) for k in ks}
