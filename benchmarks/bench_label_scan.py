"""Benchmark of the RecordIO label scan (bctkit.data.sources.recordio.RecordIOSource).

Writes two .rec/.idx pairs of --records tiny records (a few payload bytes each) in a temporary
folder: ``plain`` (no header record: every .idx line is an image, the full scan) and ``insightface``
(header record 0, images 1..N, one identity record per label). For each it times, in separate
subprocesses (separate peak RSS): the cold open (BCTKIT_CACHE an empty folder: .idx parse plus the
vectorized header scan), the cached open, and a naive per-record Python loop (parse .idx line by
line, then open/seek/read/struct.unpack each record, like the usual pure-Python readers). Labels
must be equal between the three. Prints one JSON line: wall seconds, user+system CPU seconds (the
better guide on a busy host) and peak RSS. Not part of the test suite. Usage:
    python benchmarks/bench_label_scan.py [--records 1000000] [--tmpdir /work/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import numpy as np

LAYOUTS = ("plain", "insightface")


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: VmHWM, which (unlike ru_maxrss, kept across
    exec) does not include the parent's size at fork time."""
    with suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    return os.sysconf("SC_PAGE_SIZE") * int(Path("/proc/self/statm").read_text().split()[1]) / 2**20


def _labels_for(n: int, seed: int) -> np.ndarray:
    """Skewed identity labels, about 50 images each."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, max(1, n // 50), size=n)


def build(folder: Path, layout: str, n: int) -> None:
    """Write ``n`` tiny image records in ``layout`` to ``folder``."""
    from bctkit.data.sources.recordio_writer import pack_image_record, write_insightface, write_recordio

    labels = _labels_for(n, seed=0)
    if layout == "insightface":
        write_insightface(folder, [(b"img", int(lab)) for lab in np.sort(labels)])
    else:
        write_recordio(folder, ((k, pack_image_record(b"img", float(lab))) for k, lab in enumerate(labels)))


def naive_labels(folder: Path) -> np.ndarray:
    """Labels the way pure-Python readers get them: a dict from .idx, one seek + reads per record."""
    index: dict[int, int] = {}
    keys: list[int] = []
    with open(folder / "train.idx") as fh:
        for line in fh:
            key, offset = line.strip().split("\t")
            index[int(key)] = int(offset)
            keys.append(int(key))

    with open(folder / "train.rec", "rb") as rec:
        def header(key: int) -> tuple[int, float, tuple[float, ...]]:
            rec.seek(index[key])
            _, lrec = struct.unpack("<II", rec.read(8))
            data = rec.read(lrec & ((1 << 29) - 1))
            flag, label, _, _ = struct.unpack("<IfQQ", data[:24])
            return flag, label, struct.unpack_from(f"<{flag}f", data, 24)

        flag, _, head = header(0) if 0 in index else (0, 0.0, ())
        ids = range(1, int(head[0])) if flag > 0 else keys
        out = []
        for key in ids:
            flag, label, values = header(key)
            out.append(int(values[0] if flag else label))
    return np.asarray(out, dtype=np.int64)


def worker(args: argparse.Namespace) -> dict:
    """Time one method on one layout; save its labels for the parent to compare."""
    folder = Path(args.folder)
    if args.worker == "naive":
        rss0 = _rss_mb()
        c0, t0 = os.times(), time.perf_counter()
        labels = naive_labels(folder)
        extra: dict = {}
    else:
        from bctkit.data.sources.recordio import RecordIOSource

        rss0 = _rss_mb()
        c0, t0 = os.times(), time.perf_counter()
        src = RecordIOSource(folder)
        labels = src.labels
        extra = {"from_cache": src.from_cache}
    seconds = time.perf_counter() - t0
    c1 = os.times()
    np.save(args.out, labels)
    return {"seconds": seconds, "cpu_s": (c1.user - c0.user) + (c1.system - c0.system),
            "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": rss0, **extra}


def _run_worker(method: str, folder: Path, out: Path, cache: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--folder", str(folder), "--out", str(out)]
    env = {**os.environ, "BCTKIT_CACHE": str(cache)}
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_layout(root: Path, layout: str, n: int) -> dict:
    """Build one layout, then time the cold scan, the cached open and the naive loop."""
    folder = root / layout
    t0 = time.perf_counter()
    build(folder, layout, n)
    build_s = time.perf_counter() - t0
    cache = root / f"cache-{layout}"
    cold = _run_worker("cold", folder, root / "cold.npy", cache)
    cached = _run_worker("cached", folder, root / "cached.npy", cache)
    naive = _run_worker("naive", folder, root / "naive.npy", cache)
    ref = np.load(root / "naive.npy")
    equal = all(np.array_equal(np.load(root / f"{m}.npy"), ref) for m in ("cold", "cached"))
    assert not cold["from_cache"] and cached["from_cache"], (cold, cached)
    return {
        "images": len(ref), "rec_mb": round((folder / "train.rec").stat().st_size / 2**20, 1),
        "build_s": round(build_s, 2),
        "cold_s": round(cold["seconds"], 3), "cached_s": round(cached["seconds"], 4),
        "naive_loop_s": round(naive["seconds"], 3),
        "cold_vs_naive": round(naive["seconds"] / cold["seconds"], 1),
        "cached_vs_cold": round(cold["seconds"] / cached["seconds"], 1),
        "cpu_s": {"cold": round(cold["cpu_s"], 2), "cached": round(cached["cpu_s"], 3),
                  "naive": round(naive["cpu_s"], 2)},
        "peak_rss_mb": {"cold": round(cold["peak_rss_mb"]), "cached": round(cached["peak_rss_mb"]),
                        "naive": round(naive["peak_rss_mb"])},
        "rss_before_mb": {"cold": round(cold["rss_before_mb"]), "naive": round(naive["rss_before_mb"])},
        "labels_equal": equal,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--tmpdir", default=None, help="where the .rec/.idx pairs are written")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return
    result: dict = {"bench": "recordio_label_scan", "records": args.records,
                    "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="bench_label_scan_", dir=args.tmpdir) as tmp:
        layouts = {layout: run_layout(Path(tmp), layout, args.records) for layout in LAYOUTS}
    plain = layouts["plain"]
    result.update({k: plain[k] for k in ("cold_s", "cached_s", "naive_loop_s", "cold_vs_naive",
                                          "cached_vs_cold")})
    result["peak_rss_mb"] = plain["peak_rss_mb"]["cold"]
    result["layouts"] = layouts
    result["labels_equal"] = all(v["labels_equal"] for v in layouts.values())
    result["host_cpus"] = os.cpu_count()
    result["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
