"""``bctkit demo --upgrade``: the README's upgrade walk-through, run end to end on files the demo
writes (:mod:`bctkit.run.example_upgrade`): train the new model against an arcface_torch-format
production model, gate on its certificate, export it to ONNX, and roll a gallery half-way through
the backfill while the new model's queries search both versions. Each step is the bctkit command
the README shows, printed before it runs."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bctkit.errors import BctkitError, ConfigError
from bctkit.evaluation.report import report_dir
from bctkit.gallery.backends.sqlite.schema import DB_NAME
from bctkit.run.example_upgrade import FULL, QUICK, prepare
from bctkit.storage import read_json, write_json, write_text


class StepFailed(BctkitError):
    """A walk-through command exited non-zero (its own message is already on stderr)."""

    def __init__(self, argv: list[str], code: int) -> None:
        super().__init__(f"demo --upgrade: `bctkit {shlex.join(argv)}` exited {code}")
        self.code = code


def _step(argv: list[str]) -> None:
    from bctkit.cli.main import main  # the same dispatch a shell command goes through

    print(f"\n$ bctkit {shlex.join(argv)}", flush=True)
    code = main(argv)
    sys.stdout.flush()
    if code != 0:
        raise StepFailed(argv, code)


def top1(hits_file: Path) -> float:
    """Share of queries (in %) whose best hit is an image of the query's identity (its folder)."""
    rows = read_json(hits_file)["queries"]
    good = sum(bool(r["results"]) and r["results"][0]["id"].split("/")[0] == r["query"].split("/")[0]
               for r in rows)
    return 100.0 * good / max(len(rows), 1)


def fresh_gallery(path: Path) -> None:
    """Remove the store an earlier demo run left at ``path`` (the demo rebuilds it every run); a folder
    there that is not a gallery store is refused, not removed."""
    if not path.exists():
        return
    if not (path / DB_NAME).is_file():
        raise ConfigError(f"{path} exists and is not a gallery store of an earlier demo; "
                          "choose another --out")
    shutil.rmtree(path)


def run_upgrade_demo(args: argparse.Namespace) -> int:
    """Write the example files, then every step of the walk-through; returns 0 when the new model
    passed its certificate and every step ran (a failed claim stops at the gate with exit 3)."""
    if args.full or args.scenarios or args.reuse_old_from or args.overrides:
        raise ConfigError("demo --upgrade: --full, --scenarios, --reuse-old-from and --set do not apply; "
                          "edit OUT/upgrade.yaml and run `bctkit run` for other settings")
    out = Path(args.out if args.out != "bctkit-demo" else "bctkit-upgrade-demo")
    quiet = ["--quiet"] if args.quiet else []
    t0 = time.perf_counter()
    config = prepare(out, QUICK if args.quick else FULL, progress=not args.quiet)
    prepared = time.perf_counter() - t0
    run, data = out / "run", out / "data"
    cert = run / "certificates" / "bct__old.json"
    new, old = run / "models" / "bct" / "model.safetensors", run / "models" / "old" / "model.safetensors"
    _step(["run", str(config), "--out", str(run), *(["--resume"] if args.resume else []),
           *(["--overwrite"] if args.overwrite else []), *quiet])
    try:
        _step(["certificate", "verify", str(cert)])
    except StepFailed as exc:
        where = report_dir(run, "test") / "report.md"
        print(f"the new model is not compatible: see the Diagnosis section of {where}", file=sys.stderr)
        return exc.code
    export = out / "export" / "bct"
    _step(["export", str(new), "--format", "onnx", "--out", str(export)])
    gallery = out / "gallery"
    fresh_gallery(gallery)
    items = sum(1 for _ in (data / "gallery").rglob("*.png"))
    hits_old, hits_half = out / "hits-before-backfill.json", out / "hits-half-backfilled.json"
    onnx = str(export / "model.onnx")  # the served model searches
    _step(["gallery", "create", str(gallery)])
    _step(["gallery", "add", str(gallery), "--model", str(old), "--images", str(data / "gallery"), *quiet])
    _step(["gallery", "certify", str(gallery), str(cert)])
    _step(["gallery", "search", str(gallery), "--model", onnx, "--images", str(data / "queries"), "-k", "5",
           "--out", str(hits_old), *quiet])
    _step(["gallery", "backfill", str(gallery), "--model", str(new), "--images", str(data / "gallery"),
           "--order", "benefit", "--limit", str(items // 2), *quiet])
    _step(["gallery", "search", str(gallery), "--model", onnx, "--images", str(data / "queries"), "-k", "5",
           "--out", str(hits_half), *quiet])
    report = report_dir(run, "test") / "report.json"
    _step(["gallery", "status", str(gallery), "--report", str(report)])
    _summary(out, read_json(cert), top1(hits_old), top1(hits_half), items, prepared, time.perf_counter() - t0)
    return 0


def _summary(out: Path, cert: dict[str, Any], before: float, half: float, items: int, prepared: float,
             total: float) -> None:
    """Print and write (``OUT/summary.md``, ``OUT/summary.json``) what the walk-through showed."""
    crit = cert["criterion"]
    facts = {"criterion": crit, "gallery_items": items, "backfilled": items // 2,
             "search_top1_before_backfill": round(before, 2),
             "search_top1_half_backfilled": round(half, 2),
             "seconds_preparing": round(prepared, 1), "seconds_total": round(total, 1)}
    lines = [
        "# bctkit demo --upgrade",
        "",
        f"- certificate: {crit['metric']} cross {100 * crit['cross']:.2f} % > old self "
        f"{100 * crit['old_self']:.2f} %: passed",
        f"- gallery of {items} old-model items; new-model queries (ONNX export), top-1 of the query's "
        f"identity: {before:.2f} % before any backfill, {half:.2f} % with {items // 2} items backfilled",
        f"- {total / 60:.1f} min in all ({prepared / 60:.1f} min writing the example's data and old model)",
    ]
    write_json(out / "summary.json", facts)
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines[2:]) + f"\nsummary: {out}/summary.md")
