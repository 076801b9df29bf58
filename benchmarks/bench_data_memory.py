"""Peak memory of the data path: allocation + one training epoch + the old-feature cache, on an
on-disk RecordIO set of N small images, against the in-memory path (every image decoded into one
uint8 array, as bctkit did before dataset sources) on the same set. Two sizes show whether memory
grows with N. Each measurement runs in a fresh process. Prints one JSON line.

Memory is sampled every 20 ms from /proc/self/status: ``peak_anon_mb`` (RssAnon: memory the process
owns), per stage (open: the label scan, cold; allocate; train: one epoch; cache: the old features)
and overall, and ``peak_rss_mb`` (VmHWM, which also counts pages of files it maps, e.g. the feature
cache); the loader workers' peak (``workers_peak_rss_mb``) is their own, shared pages included.
The number of identities is the same at every size (``--identities``): the classifier's memory
grows with the identities, not with the images, and is not the data path's.

    python benchmarks/bench_data_memory.py [--sizes 200000 400000] [--workers 2] [--tmpdir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32


def make_rec(folder: Path, n: int, identities: int) -> None:
    """n 32 x 32 RGB JPEGs in the insightface layout, ``identities`` labels in equal blocks."""
    from bctkit.data.sources.recordio_writer import write_insightface

    rng = np.random.default_rng(0)
    per = -(-n // identities)

    def encoded():
        for i in range(n):
            coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            buf = io.BytesIO()
            img = Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
            img.save(buf, "JPEG", quality=90)
            yield buf.getvalue(), i // per

    write_insightface(folder, list(encoded()))


class Peak:
    """Samples RssAnon and VmHWM of this process in a thread; ``stage`` records the peak of RssAnon
    since the previous stage."""

    def __init__(self) -> None:
        self.anon = 0
        self.since = 0
        self.stages: dict[str, float] = {}
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _status() -> dict[str, int]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def _run(self) -> None:
        while not self.stop:
            now = self._status()["RssAnon"]
            self.anon, self.since = max(self.anon, now), max(self.since, now)
            time.sleep(0.02)

    def stage(self, name: str) -> None:
        now = self._status()["RssAnon"]
        self.stages[f"{name}_peak_anon_mb"] = round(max(self.since, now) / 1024, 1)
        self.since = now

    def result(self) -> dict[str, float]:
        self.stop = True
        self.thread.join()
        status = self._status()
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return {"peak_anon_mb": round(max(self.anon, status["RssAnon"]) / 1024, 1),
                "peak_rss_mb": round(status["VmHWM"] / 1024, 1),
                "workers_peak_rss_mb": round(children / 1024, 1), **self.stages}


def child(rec: Path, mode: str, workers: int, cache: Path) -> dict:
    import torch

    from bctkit.data.allocation import allocate
    from bctkit.data.sources import ArraySource, RecordIOSource
    from bctkit.engine.loader import Feed
    from bctkit.models import BackboneConfig, HeadConfig
    from bctkit.models.store import fingerprint, freeze
    from bctkit.run.cache import OldFeatureCache
    from bctkit.training import TrainConfig, train_model

    torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers) if mode == "disk" else os.cpu_count() or 1)
    peak = Peak()
    times = {}
    t0 = time.perf_counter()
    source = RecordIOSource(rec)
    if mode == "memory":
        images = np.stack([source.decode(i) for i in range(len(source))])
        source = ArraySource(images, source.labels, "decoded")
        workers = 0
    times["open_s"] = time.perf_counter() - t0
    peak.stage("open")
    t0 = time.perf_counter()
    alloc = allocate(source.labels, "extended-data", 0.3, 666)
    old_set = source.subset(alloc.old_indices, alloc.old_labels)
    new_set = source.subset(alloc.new_indices, alloc.new_labels)
    times["allocate_s"] = time.perf_counter() - t0
    peak.stage("allocate")
    bb = BackboneConfig(arch="r8", width=8, in_channels=3, image_size=SIZE, embedding_dim=64)
    t0 = time.perf_counter()
    res = train_model(Feed(old_set, workers=workers), bb, HeadConfig(type="arcface", s=32, m=0.3),
                      TrainConfig(epochs=1, batch_size=256), progress=False)
    times["train_epoch_s"] = time.perf_counter() - t0
    peak.stage("train")
    t0 = time.perf_counter()
    model = freeze(res.backbone)
    feats = OldFeatureCache(cache).get(model, fingerprint(model), Feed(new_set, workers=workers),
                                       batch_size=1024, progress=False)
    times["old_feature_cache_s"] = time.perf_counter() - t0
    peak.stage("cache")
    return {"images": len(source), "train_images": len(old_set), "cached_rows": int(feats.shape[0]),
            **{k: round(v, 1) for k, v in times.items()}, **peak.result()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[200_000, 400_000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--identities", type=int, default=10_000,
                    help="fixed across sizes, so the classifier (whose memory grows with the identities) "
                         "stays the same and only the data grows")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--child", nargs=4, metavar=("REC", "MODE", "WORKERS", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        rec, mode, workers, cache = args.child
        print(json.dumps(child(Path(rec), mode, int(workers), Path(cache))))
        return
    out: dict = {"bench": "data_memory", "image": f"{SIZE}x{SIZE} RGB JPEG", "workers": args.workers,
                 "identities": args.identities,
                 "host_cpus": os.cpu_count(), "loadavg_1m_at_start": os.getloadavg()[0], "sizes": {}}
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        env = {**os.environ, "BCTKIT_CACHE": str(Path(tmp) / "bctkit-cache")}
        for n in args.sizes:
            rec = Path(tmp) / f"rec{n}"
            t0 = time.perf_counter()
            make_rec(rec, n, args.identities)
            row: dict = {"build_s": round(time.perf_counter() - t0, 1),
                         "rec_mb": round((rec / "train.rec").stat().st_size / 2**20, 1),
                         "raw_pixels_mb": round(n * 3 * SIZE * SIZE / 2**20, 1)}
            for mode in ("disk", "memory"):
                cmd = [sys.executable, __file__, "--child", str(rec), mode, str(args.workers),
                       str(Path(tmp) / f"cache-{n}-{mode}")]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                row[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            ratio = row["disk"]["peak_anon_mb"] / row["memory"]["peak_anon_mb"]
            row["disk_vs_memory_peak_anon"] = round(ratio, 3)
            out["sizes"][str(n)] = row
    sizes = [str(n) for n in args.sizes]
    if len(sizes) >= 2:
        a, b = out["sizes"][sizes[0]], out["sizes"][sizes[-1]]
        out["disk_peak_anon_growth"] = round(b["disk"]["peak_anon_mb"] / a["disk"]["peak_anon_mb"], 3)
        out["memory_peak_anon_growth"] = round(b["memory"]["peak_anon_mb"] / a["memory"]["peak_anon_mb"], 3)
    out["loadavg_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
