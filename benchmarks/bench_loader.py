"""DataLoader throughput (decode + preprocess) at 0, 1 and 2 workers against a bare Pillow decode loop
over the same files, measured in the same run. Prints one JSON line.

The files are an image folder of 112 x 112 RGB JPEGs (face-crop size, smooth content so they compress
like photographs). ``ratio_vs_bare_x_workers`` = images/s / (bare images/s x max(1, workers)): the
issue's goal is >= 0.9 (all of a worker's time goes to decoding). Each case runs ``--rounds`` times,
interleaved with the others, and the median is reported. ``bare_2_processes`` splits the bare loop
over two forked processes: what two decoding processes reach on this machine at all (on a 2-core
machine the main process also needs the cores the two workers use). ``fresh_buffers_workers_N`` is the
path before issue 30, run side by side: each worker batch in a fresh shared-memory segment instead of a
reused slot (:mod:`bctkit.data.slots`). ``cpu_ratio_vs_bare`` = images per CPU-second of all the
processes (main + workers) / the bare loop's: the share of the CPU time that goes to decoding, which a
loaded machine leaves readable where wall-clock ratios drift.

    python benchmarks/bench_loader.py [--images 16000] [--rounds 5] [--tmpdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bctkit.data.sources import ImageFolderSource
from bctkit.data.transforms import Preprocess, TransformConfig
from bctkit.engine import loader as loader_module
from bctkit.engine.loader import Feed, sequential_batches


def make_folder(root: Path, n: int, identities: int = 200, size: int = 112) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"id{i % identities:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        img.save(folder / f"{i:07d}.jpg", quality=90)


def bare(paths: list[Path], transform: TransformConfig | None) -> float:
    """images/s of a plain loop: open, decode to RGB, optional resize/crop with Pillow, to numpy."""
    t0 = time.perf_counter()
    for p in paths:
        img = Image.open(p).convert("RGB")
        if transform is not None and transform.resize:
            img = img.resize((transform.resize[1], transform.resize[0]), Image.Resampling.BILINEAR)
        if transform is not None and transform.crop:
            h, w = transform.crop
            img = img.crop((0, 0, w, h))
        np.asarray(img)
    return len(paths) / (time.perf_counter() - t0)


def _bare_part(task: tuple[list[Path], TransformConfig | None]) -> int:
    paths, transform = task
    bare(paths, transform)
    return len(paths)


def bare_parallel(paths: list[Path], transform: TransformConfig | None, processes: int) -> float:
    """images/s of the bare loop split over ``processes`` forked processes (the machine's ceiling)."""
    parts = [(paths[k::processes], transform) for k in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_bare_part, [(p[:8], t) for p, t in parts])  # start the workers outside the timing
        t0 = time.perf_counter()
        pool.map(_bare_part, parts)
        return len(paths) / (time.perf_counter() - t0)


@contextlib.contextmanager
def fresh_buffers(on: bool) -> Iterator[None]:
    """With ``on``: no slot pool, so every worker batch goes into fresh shared memory (as before)."""
    pool = loader_module.SlotPool
    if on:
        loader_module.SlotPool = lambda *args: None  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        loader_module.SlotPool = pool  # type: ignore[misc]


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the loader's joined workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def loader(source: ImageFolderSource, workers: int, transform: TransformConfig, batch: int,
           fresh: bool = False) -> tuple[float, float]:
    """(images/s, images per CPU-second of the main process and its workers)."""
    feed = Feed(source, Preprocess(transform), workers=workers)
    feed.input_shape  # noqa: B018  (decode the first image outside the timing, as a run does once)
    c0, t0 = cpu_seconds(), time.perf_counter()
    n = 0
    with fresh_buffers(fresh):
        for images, _, _ in feed.read(sequential_batches(len(source), batch)):
            n += len(images)
    wall = time.perf_counter() - t0  # the workers are joined once the last batch is read
    return n / wall, n / (cpu_seconds() - c0)


def bare_cpu(paths: list[Path], transform: TransformConfig | None) -> tuple[float, float]:
    """(images/s, images per CPU-second) of the bare loop."""
    c0 = cpu_seconds()
    rate = bare(paths, transform)
    return rate, len(paths) / (cpu_seconds() - c0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tmpdir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out: dict = {"bench": "loader", "images": args.images, "image": "112x112 RGB JPEG q90",
                 "batch": args.batch, "host_cpus": os.cpu_count(), "loadavg_1m_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        root = Path(tmp) / "folder"
        make_folder(root, args.images)
        source = ImageFolderSource(root)
        paths = [root / source.key(i) for i in range(len(source))]
        for p in paths:  # warm the page cache so both sides read from memory
            p.read_bytes()
        cases = {"decode": TransformConfig(color="rgb"),
                 "decode+resize96+crop88": TransformConfig(color="rgb", resize=96, crop=88)}
        for name, transform in cases.items():
            bare_t = None if name == "decode" else transform
            runs: dict[str, list[float]] = {"bare_2_processes": []}
            keys = ["bare", "w0", "w1", "w2", "fresh1", "fresh2"]
            runs.update({k: [] for k in keys})
            runs.update({f"{k}_cpu": [] for k in keys})
            for _ in range(args.rounds):  # interleaved, so drifts of a shared machine hit every case
                timed = {"bare": bare_cpu(paths, bare_t)}
                runs["bare_2_processes"].append(bare_parallel(paths, bare_t, 2))
                for w in (0, 1, 2):
                    timed[f"w{w}"] = loader(source, w, transform, args.batch)
                for w in (1, 2):
                    timed[f"fresh{w}"] = loader(source, w, transform, args.batch, fresh=True)
                for k, (rate, cpu_rate) in timed.items():
                    runs[k].append(rate)
                    runs[f"{k}_cpu"].append(cpu_rate)
            med = {k: float(np.median(v)) for k, v in runs.items()}
            row: dict = {"bare_images_per_s": round(med["bare"], 1),
                         "bare_2_processes_images_per_s": round(med["bare_2_processes"], 1)}
            for w in (0, 1, 2):
                row[f"workers_{w}"] = {
                    "images_per_s": round(med[f"w{w}"], 1),
                    "ratio_vs_bare_x_workers": round(med[f"w{w}"] / (med["bare"] * max(1, w)), 3),
                    "cpu_ratio_vs_bare": round(med[f"w{w}_cpu"] / med["bare_cpu"], 3),
                }
            row["workers_2"]["ratio_vs_bare_2_processes"] = round(med["w2"] / med["bare_2_processes"], 3)
            for w in (1, 2):
                row[f"fresh_buffers_workers_{w}"] = {
                    "images_per_s": round(med[f"fresh{w}"], 1),
                    "ratio_vs_bare_x_workers": round(med[f"fresh{w}"] / (med["bare"] * w), 3),
                    "cpu_ratio_vs_bare": round(med[f"fresh{w}_cpu"] / med["bare_cpu"], 3),
                }
            row["fresh_buffers_workers_2"]["ratio_vs_bare_2_processes"] = round(
                med["fresh2"] / med["bare_2_processes"], 3)
            out[name] = row
    out["loadavg_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
