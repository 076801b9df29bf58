"""Writing a model in insightface arcface_torch's file layout: ``model.pt`` (the backbone's state
dict, as its train.py saves ``backbone.module.state_dict()``) and ``softmax_fc_gpu_<rank>.pt`` (each
rank's Partial FC state dict with its contiguous block of the classifier's rows). This is what
``old.source: checkpoint`` reads, so the upgrade demo can start from the files a production run
leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bctkit.oldside.classifier import shard_rows
from bctkit.storage import atomic_path


def shard_paths(folder: str | os.PathLike[str], ranks: int) -> list[Path]:
    """The shard files of ``ranks`` processes, in rank order."""
    return [Path(folder) / f"softmax_fc_gpu_{r}.pt" for r in range(ranks)]


def write_arcface_torch(folder: str | os.PathLike[str], backbone: dict[str, torch.Tensor],
                        classifier: torch.Tensor, ranks: int) -> tuple[Path, list[Path]]:
    """Write ``model.pt`` and one shard per rank of ``classifier`` ([classes, dim]), split as
    Partial FC splits it (the first ``classes % ranks`` ranks hold one class more); each file is
    written atomically. Returns (model path, shard paths in rank order)."""
    if classifier.ndim != 2 or not 1 <= ranks <= len(classifier):
        raise ValueError(f"classifier {tuple(classifier.shape)}: needs [classes, dim] with at least "
                         f"{ranks} classes for {ranks} ranks")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.pt"
    with atomic_path(model) as tmp:
        torch.save({k: v.detach().cpu().clone() for k, v in backbone.items()}, tmp)
    paths, start = shard_paths(folder, ranks), 0
    for rank, path in enumerate(paths):
        count = shard_rows(len(classifier), ranks, rank)
        with atomic_path(path) as tmp:
            torch.save({"weight": classifier[start:start + count].detach().cpu().clone()}, tmp)
        start += count
    return model, paths
