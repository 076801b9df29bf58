"""Benchmark of bctkit.losses.unibct.refine_prototypes (UniBCT structural refinement).

Part A: C classes x m samples x d dims of random float32 features (default 20,000 x 50 x 512):
bctkit's chunked batched solve against a naive per-class loop over class-sorted data (slice,
normalise, similarity, row softmax, torch.inverse, mean). Reports both times, their ratio, the max
abs difference of the prototypes and each one's peak RSS (each runs in its own subprocess), and
the floor, measured in bctkit's subprocess before and after its run (the lower is reported): one
GEMM pass over the rows plus reading them, i.e. gathering the new and old rows in class order into
reused buffers by blocks of whole classes and one batched per-class Gram product (B, m, d) @
(B, d, m) of the new rows, the least work any implementation of Eq. 6 does.

Part B (on by default, off with --small or --no-ms1m): the MS1Mv3 shape, 93,431 classes with
seeded negative-binomial sizes around 55 (min 1, ~5.1M rows), 512 dims; old and new features are
written to disk as float16 np.memmap (~10 GiB together, in a temporary directory that is deleted
afterwards) in shuffled class order, then refined straight from the memmaps in a subprocess.
Reports the refinement time, peak RSS, a float64 spot check of a few hundred classes and a floor:
both memmaps read once sequentially into float32 blocks plus a GEMM pass of the same flop count as
the per-class Gram matrices (blocks as (k / m_eff, m_eff, d) batches, m_eff = sum m_c^2 / n); the
floor does no gathering, so it is below what any class-ordered reading of shuffled rows costs.

Prints one JSON line: wall seconds plus user/system CPU seconds (the latter are the better guide
on a shared, busy host). Not part of the test suite. Usage:
    python benchmarks/bench_refine.py [--small] [--no-ms1m | --only-ms1m] [--no-naive] [--threads 2]
        [--chunk-size N (default: the library's)] [--tmpdir /work/tmp]
        [--data-dir DIR (keep and reuse Part B files)]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bctkit.losses.unibct import refine_prototypes

LAM, TAU = 0.9, 0.05


def _peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_since(start: os.times_result) -> dict:
    """User and system CPU seconds of this process since ``start`` (robust to a busy host)."""
    now = os.times()
    return {"user_s": now.user - start.user, "sys_s": now.system - start.system}


def _part_a_data(classes: int, per_class: int, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Shuffled random features with exactly ``per_class`` samples per class (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    n = classes * per_class
    labels = torch.arange(classes).repeat_interleave(per_class)
    labels = labels[torch.randperm(n, generator=g)]
    old = torch.randn(n, dim, generator=g)
    new = torch.randn(n, dim, generator=g)
    return old, new, labels


def naive_refine(
    old_sorted: torch.Tensor, new_sorted: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """The paper's Alg. 2 shape on class-sorted rows: one inverse per class in a Python loop."""
    out = torch.empty(counts.numel(), old_sorted.shape[1])
    start = 0
    for c, m in enumerate(counts.tolist()):
        v0 = F.normalize(old_sorted[start : start + m], dim=1)
        f = F.normalize(new_sorted[start : start + m], dim=1)
        start += m
        if m == 1:
            out[c] = v0[0]
            continue
        s = f @ f.T / TAU
        s.fill_diagonal_(float("-inf"))
        e = torch.softmax(s, dim=1)
        inv = torch.inverse(torch.eye(m) - LAM * e)
        out[c] = ((1 - LAM) * inv @ v0).mean(0)
    return out


def floor_part_a(old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, per_class: int,
                 block_classes: int = 1024) -> dict:
    """Seconds of the floor: read the rows in class order (into reused buffers) + one GEMM pass."""
    t0 = time.perf_counter()
    order = torch.argsort(labels, stable=True)
    rows = block_classes * per_class
    buf_new = torch.empty(rows, new.shape[1])
    buf_old = torch.empty(rows, old.shape[1])
    gram = torch.empty(block_classes, per_class, per_class)
    read_s = gemm_s = 0.0
    for start in range(0, order.numel(), rows):
        idx = order[start : start + rows]
        k = idx.numel() // per_class
        t1 = time.perf_counter()
        torch.index_select(new, 0, idx, out=buf_new[: idx.numel()])
        torch.index_select(old, 0, idx, out=buf_old[: idx.numel()])
        t2 = time.perf_counter()
        blk = buf_new[: idx.numel()].view(k, per_class, -1)
        torch.bmm(blk, blk.transpose(1, 2), out=gram[:k])
        read_s, gemm_s = read_s + t2 - t1, gemm_s + time.perf_counter() - t2
    return {"floor_s": time.perf_counter() - t0, "read_s": read_s, "gemm_s": gemm_s}


def worker_part_a(args: argparse.Namespace) -> dict:
    """Run one Part A implementation; save its prototypes for the parent to compare."""
    old, new, labels = _part_a_data(args.classes, args.per_class, args.dim, args.seed)
    rss_inputs = _peak_rss_mb()
    floor: list[dict] = []
    if args.worker == "a_bctkit":
        floor.append(floor_part_a(old, new, labels, args.per_class))
        c0 = os.times()
        t0 = time.perf_counter()
        protos = refine_prototypes(old, new, labels, args.classes, LAM, TAU, **_chunk_kw(args))
        seconds = time.perf_counter() - t0
        cpu = _cpu_since(c0)
        floor.append(floor_part_a(old, new, labels, args.per_class))
    else:
        order = torch.argsort(labels, stable=True)
        old_s, new_s = old[order], new[order]
        del old, new
        counts = torch.bincount(labels, minlength=args.classes)
        c0 = os.times()
        t0 = time.perf_counter()
        protos = naive_refine(old_s, new_s, counts)
        seconds = time.perf_counter() - t0
        cpu = _cpu_since(c0)
    np.save(args.out, protos.numpy())
    best = min(floor, key=lambda f: f["floor_s"]) if floor else {}
    return {"seconds": seconds, **cpu, "peak_rss_mb": _peak_rss_mb(),
            "rss_after_inputs_mb": rss_inputs, "floor": best,
            "floor_runs_s": [f["floor_s"] for f in floor]}


def _chunk_kw(args: argparse.Namespace) -> dict:
    """chunk_size for refine_prototypes: the library default unless --chunk-size is given."""
    return {} if args.chunk_size is None else {"chunk_size": args.chunk_size or "default"}


def _ms1m_sizes(classes: int, mean: float, seed: int) -> np.ndarray:
    """Seeded class sizes: 1 + negative binomial (shape 4), mean ``mean``: skewed like MS1Mv3."""
    rng = np.random.default_rng(seed)
    shape = 4.0
    p = shape / (shape + mean - 1)
    return 1 + rng.negative_binomial(shape, p, size=classes)


def make_ms1m_memmaps(root: Path, classes: int, dim: int, seed: int) -> dict:
    """Write shuffled labels and float16 old/new feature memmaps under ``root`` in row blocks."""
    sizes = _ms1m_sizes(classes, 55.4, seed)
    rng = np.random.default_rng(seed + 1)
    labels = rng.permutation(np.repeat(np.arange(classes, dtype=np.int64), sizes))
    n = int(labels.size)
    np.save(root / "labels.npy", labels)
    g = torch.Generator().manual_seed(seed + 2)
    block = 1 << 16
    for name in ("old", "new"):
        mm = np.memmap(root / f"{name}.f16", dtype=np.float16, mode="w+", shape=(n, dim))
        for start in range(0, n, block):
            stop = min(n, start + block)
            mm[start:stop] = torch.randn(stop - start, dim, generator=g).half().numpy()
        mm.flush()
        del mm
    return {"rows": n, "classes": classes, "dim": dim, "size_min": int(sizes.min()),
            "size_max": int(sizes.max()), "size_mean": round(float(sizes.mean()), 2),
            "disk_gib": round(2 * n * dim * 2 / 2**30, 2)}


def _spot_check(old: np.ndarray, new: np.ndarray, labels: np.ndarray, protos: torch.Tensor,
                n_classes: int, seed: int) -> float:
    """Max abs difference to a float64 per-class closed form (numpy) on a few random classes."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(protos.shape[0], size=n_classes, replace=False)
    worst = 0.0
    for c in picked.tolist():
        idx = np.nonzero(labels == c)[0]
        v0 = np.array(old[idx], dtype=np.float64)
        v0 /= np.linalg.norm(v0, axis=1, keepdims=True)
        f = np.array(new[idx], dtype=np.float64)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        m = len(idx)
        if m == 1:
            ref = v0[0]
        else:
            s = f @ f.T / TAU
            np.fill_diagonal(s, -np.inf)
            e = np.exp(s - s.max(axis=1, keepdims=True))
            e /= e.sum(axis=1, keepdims=True)
            ref = ((1 - LAM) * np.linalg.solve(np.eye(m) - LAM * e, v0)).mean(axis=0)
        worst = max(worst, float(np.abs(protos[c].double().numpy() - ref).max()))
    return worst


def floor_part_b(old: np.ndarray, new: np.ndarray, labels: np.ndarray, block: int = 1 << 16) -> dict:
    """Seconds of Part B's floor: both memmaps read sequentially into float32 blocks plus a GEMM
    pass with the per-class Gram matrices' flop count (blocks as (k / m_eff, m_eff, d) batches)."""
    counts = np.bincount(labels)
    m_eff = max(1, round(float((counts.astype(np.float64) ** 2).sum() / labels.size)))
    n, d = new.shape
    block = max(m_eff, block // m_eff * m_eff)
    buf = torch.empty(block, d)
    buf_old = torch.empty(block, old.shape[1])
    gram = torch.empty(block // m_eff, m_eff, m_eff)
    t0 = time.perf_counter()
    for start in range(0, n, block):
        stop = min(n, start + block)
        k = (stop - start) // m_eff
        buf[: stop - start].copy_(torch.from_numpy(np.asarray(new[start:stop])))
        buf_old[: stop - start].copy_(torch.from_numpy(np.asarray(old[start:stop])))
        blk = buf[: k * m_eff].view(k, m_eff, d)
        torch.bmm(blk, blk.transpose(1, 2), out=gram[:k])
    return {"floor_s": time.perf_counter() - t0, "m_eff": m_eff}


def worker_part_b(args: argparse.Namespace) -> dict:
    """Refine straight from the float16 memmaps; report time, peak RSS and a spot check."""
    root = Path(args.root)
    labels = np.load(root / "labels.npy")
    n = labels.size
    old = np.memmap(root / "old.f16", dtype=np.float16, mode="r", shape=(n, args.dim))
    new = np.memmap(root / "new.f16", dtype=np.float16, mode="r", shape=(n, args.dim))
    rss_inputs = _peak_rss_mb()
    c0 = os.times()
    t0 = time.perf_counter()
    protos = refine_prototypes(old, new, labels, args.classes, LAM, TAU, **_chunk_kw(args))
    seconds = time.perf_counter() - t0
    cpu = _cpu_since(c0)
    peak = _peak_rss_mb()
    floor = floor_part_b(old, new, labels)
    return {"seconds": seconds, **cpu, "peak_rss_mb": peak, "rss_after_inputs_mb": rss_inputs,
            "floor_s": floor["floor_s"], "floor_m_eff": floor["m_eff"],
            "finite": bool(torch.isfinite(protos).all()),
            "spot_check_classes": 200,
            "spot_check_max_abs_diff_vs_float64": _spot_check(old, new, labels, protos, 200,
                                                             args.seed)}


def _run_worker(extra: list[str], args: argparse.Namespace) -> dict:
    """Run this script as a worker subprocess (separate peak RSS) and parse its JSON line."""
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--dim", str(args.dim),
           "--seed", str(args.seed), *extra]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_part_a(args: argparse.Namespace) -> dict:
    """Part A: bctkit and the naive loop, each in its own subprocess, on identical data."""
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        common = ["--classes", str(args.classes), "--per-class", str(args.per_class)]
        fast = _run_worker([*common, "--worker", "a_bctkit", "--out", f"{tmp}/fast.npy"], args)
        if not args.naive:
            return {"classes": args.classes, "per_class": args.per_class, "dim": args.dim,
                    "bctkit_s": round(fast["seconds"], 3), "floor_s": round(fast["floor"]["floor_s"], 3),
                    "bctkit_over_floor": round(fast["seconds"] / fast["floor"]["floor_s"], 2),
                    "bctkit_user_sys_s": [round(fast["user_s"], 2), round(fast["sys_s"], 2)],
                    "bctkit_peak_rss_mb": round(fast["peak_rss_mb"])}
        slow = _run_worker([*common, "--worker", "a_naive", "--out", f"{tmp}/slow.npy"], args)
        diff = np.abs(np.load(f"{tmp}/fast.npy") - np.load(f"{tmp}/slow.npy")).max()
    return {
        "classes": args.classes, "per_class": args.per_class, "dim": args.dim,
        "bctkit_s": round(fast["seconds"], 3), "naive_s": round(slow["seconds"], 3),
        "speedup": round(slow["seconds"] / fast["seconds"], 2),
        "floor_s": round(fast["floor"]["floor_s"], 3),
        "floor_read_gemm_s": [round(fast["floor"]["read_s"], 3), round(fast["floor"]["gemm_s"], 3)],
        "floor_runs_s": [round(x, 3) for x in fast["floor_runs_s"]],
        "bctkit_over_floor": round(fast["seconds"] / fast["floor"]["floor_s"], 2),
        "bctkit_user_sys_s": [round(fast["user_s"], 2), round(fast["sys_s"], 2)],
        "naive_user_sys_s": [round(slow["user_s"], 2), round(slow["sys_s"], 2)],
        "speedup_cpu": round((slow["user_s"] + slow["sys_s"]) / (fast["user_s"] + fast["sys_s"]), 2),
        "max_abs_diff": float(diff),
        "bctkit_peak_rss_mb": round(fast["peak_rss_mb"]),
        "naive_peak_rss_mb": round(slow["peak_rss_mb"]),
        "bctkit_rss_after_inputs_mb": round(fast["rss_after_inputs_mb"]),
        "naive_rss_after_inputs_mb": round(slow["rss_after_inputs_mb"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="quick sanity run, Part A only")
    parser.add_argument("--no-ms1m", dest="ms1m", action="store_false", help="skip Part B")
    parser.add_argument("--only-ms1m", action="store_true", help="skip Part A")
    parser.add_argument("--no-naive", dest="naive", action="store_false",
                        help="Part A without the naive loop (bctkit and the floor only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=666)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--ms1m-classes", type=int, default=93431)
    parser.add_argument("--tmpdir", default=None, help="where Part B writes its ~10 GiB memmaps")
    parser.add_argument("--data-dir", default=None,
                        help="keep Part B's memmaps here and reuse them on later runs")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.worker is not None:
        fn = worker_part_b if args.worker == "b" else worker_part_a
        print(json.dumps(fn(args)))
        return

    if args.classes is None:
        args.classes = 500 if args.small else 20000
    result: dict = {"bench": "refine_prototypes", "threads": args.threads,
                    "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
                    "torch": torch.__version__, "chunk_size": args.chunk_size or "default"}
    if not args.only_ms1m:
        result["part_a"] = run_part_a(args)

    if args.ms1m and not args.small:
        keep = args.data_dir is not None
        root = Path(args.data_dir) if keep else Path(tempfile.mkdtemp(prefix="bench_refine_",
                                                                      dir=args.tmpdir))
        meta_path = root / "meta.json"
        try:
            t0 = time.perf_counter()
            if keep and meta_path.exists():
                shape = json.loads(meta_path.read_text())
            else:
                root.mkdir(parents=True, exist_ok=True)
                shape = make_ms1m_memmaps(root, args.ms1m_classes, args.dim, args.seed)
                meta_path.write_text(json.dumps(shape))
            gen_s = time.perf_counter() - t0
            b = _run_worker(["--worker", "b", "--root", str(root),
                             "--classes", str(shape["classes"])], args)
        finally:
            if not keep:
                shutil.rmtree(root, ignore_errors=True)
        result["part_b"] = {
            **shape, "storage": "float16 np.memmap", "generate_s": round(gen_s, 1),
            "refine_s": round(b["seconds"], 2), "floor_s": round(b["floor_s"], 2),
            "floor_m_eff": b["floor_m_eff"], "refine_over_floor": round(b["seconds"] / b["floor_s"], 2),
            "refine_user_sys_s": [round(b["user_s"], 2), round(b["sys_s"], 2)],
            "peak_rss_mb": round(b["peak_rss_mb"]),
            "rss_after_inputs_mb": round(b["rss_after_inputs_mb"]), "finite": b["finite"],
            "spot_check_classes": b["spot_check_classes"],
            "spot_check_max_abs_diff_vs_float64": b["spot_check_max_abs_diff_vs_float64"],
        }
    result["host_cpus"] = os.cpu_count()
    result["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
