"""Chunked row reading of a feature matrix: a torch tensor, a numpy array or an ``np.memmap`` file
(float16 fine) larger than RAM.

Rows are read in contiguous blocks (:func:`row_blocks`) or gathered by id into buffers reused across
chunks (:class:`RowReader`), and converted to the compute dtype only there, so a matrix as large as
MS1Mv3's features never has to be decoded into memory as a whole. Rows of a memmap can be read ahead
in file order for a group of chunks (:func:`prefetch_groups`, :meth:`RowReader.prefetch`), and its
mapped pages are released once the file-backed resident memory passes a budget.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from bctkit.errors import DataError

Matrix = torch.Tensor | np.ndarray

__all__ = ["Matrix", "RowReader", "prefetch_groups", "row_blocks"]

_MAPPED_BUDGET_BYTES = 1 << 30  # file-backed RSS that triggers unmapping memmap pages
_STAGING_BYTES = 512 << 20  # memmap rows read ahead, in file order, for a group of chunks


def _check_finite(name: str, block: torch.Tensor, row_ids: torch.Tensor | int) -> None:
    """Raise DataError naming the first non-finite row; ``row_ids`` maps block rows to input rows
    (a tensor of ids, or the input row of the block's first row)."""
    bad_rows = ~torch.isfinite(block).all(dim=1)
    if bool(bad_rows.any()):
        first = int(bad_rows.nonzero()[0, 0])
        row = row_ids + first if isinstance(row_ids, int) else int(row_ids[first])
        raise DataError(f"{name} row {row} contains NaN or Inf; expected finite features")


def _resident_file_bytes() -> float:
    """File-backed resident memory of this process (Linux /proc/self/statm); inf if unknown."""
    try:
        with open("/proc/self/statm") as fh:
            shared_pages = int(fh.read().split()[2])
        return float(shared_pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return math.inf


def _release_mapped_pages(x: object) -> None:
    """Unmap the pages of a read-only or shared ``np.memmap`` once reading has mapped too many.

    Rows read through a file mapping stay counted in the process RSS until unmapped, so reading a
    whole 10 GiB memmap would show a 10 GiB RSS. When the file-backed resident memory passes
    ``_MAPPED_BUDGET_BYTES`` the mapping's pages are dropped (MADV_DONTNEED); the data stays in the
    OS page cache, so a re-read costs a minor fault. Releasing only past a budget, not after every
    chunk, avoids most of those faults. Copy-on-write maps (mode "c") are left alone, since
    MADV_DONTNEED would discard their private changes.
    """
    mapping = getattr(x, "_mmap", None)
    if not isinstance(x, np.memmap) or getattr(x, "mode", "c") == "c":
        return
    if not isinstance(mapping, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    if _resident_file_bytes() < _MAPPED_BUDGET_BYTES:
        return
    try:
        mapping.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        return


class RowReader:
    """Gathers rows of one input into a buffer reused across chunks, converted to ``dtype``.

    numpy inputs (memmaps included) are gathered in their own dtype into a staging array and then
    converted, so only the requested rows are ever decoded; reusing the buffers avoids paying for
    fresh pages on every chunk.
    """

    def __init__(
        self, x: Matrix, max_rows: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.x = x
        d = int(x.shape[1])
        self.out = torch.empty(max_rows, d, dtype=dtype, device=device)
        self.stage: np.ndarray | torch.Tensor | None = None
        self.cache: np.ndarray | None = None
        self.cached_rows: np.ndarray | None = None
        if isinstance(x, np.ndarray):
            self.stage = np.empty((max_rows, d), dtype=x.dtype)
        elif x.dtype != dtype or x.device != device:
            self.stage = torch.empty(max_rows, d, dtype=x.dtype, device=x.device)

    def prefetch(self, rows: torch.Tensor) -> None:
        """Read ``rows`` of a memmap, in file order, into memory for the next ``take`` calls.

        Rows of a chunk of classes are scattered over the file; reading the rows of many chunks
        at once in ascending order lets one page fault serve many rows, where reading each chunk
        on its own cost one fault per row (most of the run time for a float16 MS1Mv3 memmap).
        """
        if not isinstance(self.x, np.memmap):
            return
        self.cache = None
        self.cached_rows = np.sort(rows.numpy())
        self.cache = np.empty((self.cached_rows.size, self.x.shape[1]), dtype=self.x.dtype)
        # read window by window of the file, so mapped pages can be released in between
        window = max(1, _MAPPED_BUDGET_BYTES // 4 // max(1, self.x.shape[1] * self.x.itemsize))
        edges = np.searchsorted(self.cached_rows, np.arange(0, self.x.shape[0] + window, window))
        for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
            if hi > lo:
                np.take(self.x, self.cached_rows[lo:hi], axis=0, out=self.cache[lo:hi], mode="clip")
                _release_mapped_pages(self.x)

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (CPU int64 ids, any order, repeats allowed) as a (k, d) view."""
        k = rows.numel()
        out = self.out[:k]
        if isinstance(self.x, np.ndarray):
            stage = self.stage[:k]
            if self.cache is not None:
                at = np.searchsorted(self.cached_rows, rows.numpy())
                np.take(self.cache, at, axis=0, out=stage, mode="clip")
            else:
                np.take(self.x, rows.numpy(), axis=0, out=stage, mode="clip")
                _release_mapped_pages(self.x)
            out.copy_(torch.from_numpy(stage))
        elif self.stage is None:
            torch.index_select(self.x.detach(), 0, rows.to(self.x.device), out=out)
        else:
            stage = self.stage[:k]
            torch.index_select(self.x.detach(), 0, rows.to(self.x.device), out=stage)
            out.copy_(stage)
        return out

    def take_range(self, start: int, stop: int) -> torch.Tensor:
        """Contiguous rows start:stop as a (k, d) view of the reader's own buffer."""
        out = self.out[: stop - start]
        if isinstance(self.x, np.ndarray):
            stage = self.stage[: stop - start]
            stage[...] = self.x[start:stop]
            _release_mapped_pages(self.x)
            out.copy_(torch.from_numpy(stage))
        else:
            out.copy_(self.x.detach()[start:stop])
        return out


def row_blocks(
    name: str, x: Matrix, block_rows: int, dtype: torch.dtype, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first row, finite-checked block converted to ``dtype``) over contiguous row blocks."""
    n = int(x.shape[0])
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        if isinstance(x, torch.Tensor):
            block = x.detach()[start:stop].to(device=device, dtype=dtype)
        else:
            block = torch.from_numpy(np.array(x[start:stop])).to(device, dtype)
            _release_mapped_pages(x)
        _check_finite(name, block, start)
        yield start, block


def prefetch_groups(x: Matrix, chunk_rows: Iterable[int]) -> dict[int, int]:
    """Split a sequence of chunks, given by their row counts, into runs of consecutive chunks holding
    about ``_STAGING_BYTES`` of ``x``'s rows, to be read ahead together by :meth:`RowReader.prefetch`.

    Returns {first chunk index: end chunk index} for each run; a run has at least one chunk. Only a
    memmap is read ahead: for any other ``x`` the answer is {} (and ``chunk_rows`` is not consumed).
    """
    if not isinstance(x, np.memmap):
        return {}
    row_bytes = int(x.shape[1]) * x.dtype.itemsize
    group_rows = max(1, _STAGING_BYTES // max(1, row_bytes))
    groups: dict[int, int] = {}
    start, rows, end = 0, 0, 0
    for i, n in enumerate(chunk_rows):
        if i > start and rows + n > group_rows:
            groups[start] = i
            start, rows = i, 0
        rows += n
        end = i + 1
    if end:
        groups[start] = end
    return groups
