"""``bctkit extract``: embed every image of a dataset with a saved model into a feature file.

The rows are cut into chunks of ``chunk_batches`` batches of ``batch_size`` images, in source order.
Each finished chunk is written (atomically) to a folder beside the output,
``<out>.partial-<key>``, where ``key`` hashes what the rows depend on: the model (fingerprint, and an
export's format and file hash), the source's fingerprint, the flip test, the precision, the device
type (a CPU rounds otherwise than a GPU), the batch size and the chunk size. A rerun with the same
inputs skips the chunks already there, so a killed extraction continues where it stopped, and the
final file is the same, byte for byte, as one uninterrupted run: every batch is the same batch,
whatever was done before. Once the file is written, the partial folders of every extraction into
the same file go, including those an interrupted run with other settings (say another batch size)
left; a run that fails before finishing its first chunk leaves no partial folder.

Under torchrun each rank embeds a contiguous share of every chunk's batches (whole batches, so each
image goes through the network in the same batch as in one process); rank 0 gathers the chunk,
writes it, shows the progress bar, and at the end writes the feature file and removes the partial
folder.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from bctkit.data.datasets import open_dataset
from bctkit.data.sources.base import DataSource, PathSource, PathTable
from bctkit.data.sources.recordio import RecordIOSource
from bctkit.engine.compute import Engine
from bctkit.engine.distributed import barrier, broadcast_object, gather_rows, is_main, share
from bctkit.engine.loader import Feed
from bctkit.engine.precision import PrecisionName
from bctkit.errors import ConfigError, FileFormatError
from bctkit.extract.model import ExtractModel, check_input, open_model
from bctkit.features import FeatureSet, iter_features
from bctkit.storage import META_KEY, save_tensors, write_json

__all__ = ["extract_to_file", "partial_dir", "row_keys"]

FORMAT_VERSION = 1


def row_keys(source: DataSource) -> PathTable:
    """Every image's :meth:`~bctkit.data.sources.base.DataSource.key` in source order: the path
    relative to the root for file sources (their table as is), the record id for RecordIO."""
    if isinstance(source, PathSource):
        return source.paths
    if isinstance(source, RecordIOSource):
        return PathTable.from_paths([str(int(r)) for r in source.record_ids])
    return PathTable.from_paths([source.key(i) for i in range(len(source))])


def partial_dir(out: Path, key: str) -> Path:
    """The folder of finished chunks of the extraction ``key`` into ``out``."""
    return out.parent / f"{out.name}.partial-{key}"


def extract_to_file(model: str | os.PathLike[str], data: str | os.PathLike[str] | DataSource,
                    out: str | os.PathLike[str], *, batch_size: int = 256, workers: int = 0,
                    flip: bool = False, device: str = "auto", precision: PrecisionName = "fp32",
                    chunk_batches: int = 64, progress: bool = True) -> Path:
    """Embed every image of ``data`` (a path for :func:`~bctkit.data.datasets.open_dataset`, or a
    source) with the model at ``model`` (see :func:`~bctkit.extract.model.open_model`) into the
    feature file ``out`` (``feats``, ``labels``, row keys and metadata; see the module docstring for
    chunks, resuming and torchrun). ``workers``: DataLoader workers. Returns ``out``."""
    out = Path(out).expanduser()
    if batch_size < 1 or chunk_batches < 1:
        raise ConfigError(f"--batch-size {batch_size} and --chunk-batches {chunk_batches} must be >= 1")
    _check_out(out)
    engine = Engine.create(device, precision, field="--device")
    net = open_model(model, engine.device)
    source = data if isinstance(data, DataSource) else open_dataset(data)
    feed = Feed(source, net.preprocess, workers, pin_memory=engine.device.type == "cuda")
    check_input(net, feed, str(model))
    meta = _meta(net, source, data, flip, precision, batch_size)
    key = _key(net, source, flip, f"{precision} on {engine.device.type}", batch_size, chunk_batches)
    parts = partial_dir(out, key)
    n, rows_per_chunk = len(source), batch_size * chunk_batches
    chunks = [(s, min(s + rows_per_chunk, n)) for s in range(0, n, rows_per_chunk)]
    plan = {"key": key, "out": str(out), "rows": n, "chunk_rows": rows_per_chunk, "chunks": len(chunks),
            "meta": meta}
    try:
        _write_chunks(parts, chunks, plan, net.dim, progress,
                      lambda rows: _chunk_share(net, feed, rows, batch_size, flip, engine))
    except BaseException:
        if is_main() and not any(parts.glob("chunk-*.safetensors")):  # nothing to resume from
            shutil.rmtree(parts, ignore_errors=True)
        raise
    if is_main():
        feats = torch.empty((n, net.dim), dtype=torch.float32)
        for k, (a, b) in enumerate(chunks):
            feats[a:b] = _read_chunk(parts, k)
        FeatureSet(feats, torch.from_numpy(source.labels.astype(np.int64)), meta, row_keys(source)).save(out)
        for folder in out.parent.glob(f"{glob.escape(out.name)}.partial-*"):  # also other settings' chunks
            shutil.rmtree(folder, ignore_errors=True)
    barrier()
    return out


def _write_chunks(parts: Path, chunks: list[tuple[int, int]], plan: dict[str, Any], dim: int,
                  progress: bool, embed: Callable[[tuple[int, int]], torch.Tensor]) -> None:
    """Embed (``embed(rows)``: this rank's share) and write every chunk not already in ``parts``
    (``plan``: the extraction's key, rows and chunks, written beside them)."""
    key, done = plan["key"], None
    if is_main():
        write_json(parts / "plan.json", plan)
        done = [k for k, rows in enumerate(chunks) if _chunk_ok(parts, k, rows, key, dim)]
    done = set(broadcast_object(done))
    with tqdm(total=plan["rows"], initial=sum(b - a for k, (a, b) in enumerate(chunks) if k in done),
              unit="img", desc="extract", disable=not (progress and is_main())) as bar:
        for k, rows in enumerate(chunks):
            if k in done:
                continue
            feats = gather_rows(embed(rows))
            if feats is not None:
                save_tensors(_chunk_path(parts, k), {"feats": feats},
                             {"key": key, "chunk": k, "rows": list(rows)})
                bar.update(rows[1] - rows[0])


def _check_out(out: Path) -> None:
    """A file name ending in .safetensors whose folder exists (or can be made) and is writable."""
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: a feature file is safetensors; end its name with .safetensors")
    if out.is_dir():
        raise FileFormatError(f"--out {out}: is a folder; give a file name (e.g. {out}/features.safetensors)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileFormatError(f"--out {out}: cannot create its folder ({exc.strerror or exc})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise FileFormatError(f"--out {out}: the folder {out.parent} is not writable")


def _meta(net: ExtractModel, source: DataSource, data: Any, flip: bool, precision: str, batch_size: int
          ) -> dict[str, Any]:
    """What the feature file says about its rows (nothing about the machine or the processes, so one
    process and torchrun write the same file)."""
    kind = "record id in the RecordIO index" if isinstance(source, RecordIOSource) else (
        "image path relative to the dataset root" if isinstance(source, PathSource) else "source key")
    return {
        **net.meta, "flip": flip, "precision": precision, "batch_size": batch_size,
        "dataset": source.name, "images_fingerprint": source.fingerprint(), "images": len(source),
        "data": str(Path(data).expanduser().resolve()) if not isinstance(data, DataSource) else source.name,
        "preprocessing": net.preprocess.spec(net.input_shape), "keys": kind,
        "written_by": f"bctkit extract (format {FORMAT_VERSION})",
    }


def _key(net: ExtractModel, source: DataSource, flip: bool, precision: str, batch_size: int,
         chunk_batches: int) -> str:
    spec = {"version": FORMAT_VERSION, "model": net.identity, "images": source.fingerprint(),
            "n": len(source), "flip": flip, "precision": precision, "batch_size": batch_size,
            "chunk_batches": chunk_batches, "preprocessing": net.preprocess.spec(net.input_shape)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _chunk_share(net: ExtractModel, feed: Feed, rows: tuple[int, int], batch_size: int, flip: bool,
                 engine: Engine) -> torch.Tensor:
    """This rank's features of chunk ``rows``: a contiguous share of its whole batches."""
    start, end = rows
    b0, b1 = share(-(-(end - start) // batch_size))
    mine = (start + b0 * batch_size, min(start + b1 * batch_size, end))
    if mine[0] >= mine[1]:
        return torch.zeros((0, net.dim), dtype=torch.float32)
    parts = [f for _, f in iter_features(net.net, feed, batch_size, flip, False, "extract", engine, mine)]
    feats = torch.cat(parts)
    if feats.ndim != 2 or feats.shape[1] != net.dim:
        raise FileFormatError(f"{net.meta['model_file']}: the model gives features of shape "
                              f"{list(feats.shape)}; its metadata says {net.dim} dims")
    return feats


def _chunk_path(parts: Path, k: int) -> Path:
    return parts / f"chunk-{k:06d}.safetensors"


def _chunk_ok(parts: Path, k: int, rows: tuple[int, int], key: str, dim: int) -> bool:
    """Whether chunk ``k`` was written by this extraction, whole (checked from its header)."""
    path = _chunk_path(parts, k)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(META_KEY, "{}"))
            names = list(fh.keys())
            shape = list(fh.get_slice("feats").get_shape()) if "feats" in names else None
    except (SafetensorError, OSError, ValueError):
        return False
    return (meta.get("key") == key and meta.get("chunk") == k and meta.get("rows") == list(rows)
            and shape == [rows[1] - rows[0], dim])


def _read_chunk(parts: Path, k: int) -> torch.Tensor:
    with safe_open(str(_chunk_path(parts, k)), framework="pt") as fh:
        return fh.get_tensor("feats")
