"""``bctkit extract MODEL DATA --out FILE``: every image of a dataset embedded into a feature file."""

from __future__ import annotations

import argparse
from typing import Any

from bctkit.engine.distributed import is_main

NAMES = ("extract",)


def add_parser(sub: Any) -> None:
    """Register ``extract``."""
    xt = sub.add_parser("extract", help="embed every image of a dataset with a saved model into a feature "
                                        "file (row keys included; resumable; torchrun splits the work)")
    xt.add_argument("model", help="bctkit model (RUN/models/<name>/ or its model.safetensors) or a bctkit "
                                  "export (its folder, or model.pt / model.onnx / embedding.safetensors)")
    xt.add_argument("data", help="image folder (root/<identity>/<image>), 'path label' list file, or "
                                 "RecordIO folder (train.rec + train.idx)")
    xt.add_argument("--out", required=True, help="feature file to write (.safetensors)")
    xt.add_argument("--flip", action="store_true", help="add the features of the mirrored images (flip test)")
    xt.add_argument("--batch-size", type=int, default=256)
    xt.add_argument("--workers", type=int, help="DataLoader workers (default: the usable CPUs, at most 8)")
    xt.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    xt.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    xt.add_argument("--chunk-batches", type=int, default=64,
                    help="batches per resumable chunk (a rerun after a kill continues from the last one)")
    xt.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from bctkit.data.workers import auto_workers
    from bctkit.extract import extract_to_file

    workers = auto_workers() if args.workers is None else args.workers
    out = extract_to_file(args.model, args.data, args.out, batch_size=args.batch_size, workers=workers,
                          flip=args.flip, device=args.device, precision=args.precision,
                          chunk_batches=args.chunk_batches, progress=not args.quiet)
    if is_main():
        print(f"extract: {out}")
    return 0
