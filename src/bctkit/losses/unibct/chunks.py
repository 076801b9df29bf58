"""How UniBCT's structural refinement groups classes: chunks of classes of similar size padded to
a common size m (:func:`plan_chunks`), and batches of chunks of equal m run as one set of batched
ops (:func:`batch_chunks`). Loops over distinct sizes and chunks, never over classes."""

from __future__ import annotations

import torch

__all__ = ["batch_chunks", "plan_batches", "plan_chunks"]

_BATCH_ROWS = 32768  # chunks of equal padded size run together, up to this many rows
_EDGE_BUDGET = 1 << 24  # at most this many (B, m, m) elements per batch (64 MiB in float32)


def plan_chunks(counts: torch.Tensor, chunk_size: int) -> list[tuple[torch.Tensor, int]]:
    """Group classes of similar size into chunks of at most ``chunk_size`` padded rows.

    Classes are sorted by size; a chunk holds consecutive classes and is padded to its largest
    class. A chunk is closed early when adding the next size would leave it less than 3/4 real
    rows, so padding wastes little work. A class larger than ``chunk_size`` gets a chunk alone.
    Returns (class ids, padded size) per chunk. Loops over distinct sizes, not over classes.
    """
    present = (counts > 0).nonzero().squeeze(1)
    if present.numel() == 0:
        return []
    sizes = counts[present]
    by_size = torch.argsort(sizes, stable=True)
    cls_sorted, sizes_sorted = present[by_size], sizes[by_size]
    uniq, group_len = torch.unique_consecutive(sizes_sorted, return_counts=True)

    bounds: list[tuple[int, int, int]] = []
    begin, cur, cur_real, last_m = 0, 0, 0, 0
    for m, k in zip(uniq.tolist(), group_len.tolist(), strict=True):
        cap = max(1, chunk_size // m)
        if cur and cur < cap:
            take = min(k, cap - cur)
            if cur_real + take * m < 0.75 * (cur + take) * m:
                bounds.append((begin, begin + cur, last_m))
                begin, cur, cur_real = begin + cur, 0, 0
        while k > 0:
            if cur >= cap:
                bounds.append((begin, begin + cur, last_m))
                begin, cur, cur_real = begin + cur, 0, 0
            take = min(k, cap - cur)
            cur, cur_real, k, last_m = cur + take, cur_real + take * m, k - take, m
    if cur:
        bounds.append((begin, begin + cur, last_m))
    return [(cls_sorted[b:e], m) for b, e, m in bounds]


def batch_chunks(
    plan: list[tuple[torch.Tensor, int]], batch_rows: int
) -> list[tuple[torch.Tensor, int]]:
    """Merge consecutive chunks of equal padded size m into batches of at most ``batch_rows`` padded
    rows and ``_EDGE_BUDGET`` edge-matrix elements (B * m * m). Every class keeps the padded size
    its chunk gave it, so the per-class arithmetic (and result) does not change; only fewer, larger
    batched ops run, which matters most on a busy host where each threaded op can wait for a core.
    """
    batches: list[tuple[list[torch.Tensor], int, int]] = []
    for cls, m in plan:
        if batches and batches[-1][1] == m:
            parts, _, b = batches[-1]
            if (b + cls.numel()) * m <= batch_rows and (b + cls.numel()) * m * m <= _EDGE_BUDGET:
                parts.append(cls)
                batches[-1] = (parts, m, b + cls.numel())
                continue
        batches.append(([cls], m, cls.numel()))
    return [(torch.cat(parts), m) for parts, m, _ in batches]


def plan_batches(counts: torch.Tensor, chunk_size: int) -> list[tuple[torch.Tensor, int]]:
    """The chunk plan of :func:`plan_chunks`, batched by :func:`batch_chunks`."""
    return batch_chunks(plan_chunks(counts, chunk_size), max(chunk_size, _BATCH_ROWS))
