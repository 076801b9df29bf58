"""Which kind of run a config asks for, chosen in one place above both run classes: the benchmark
run (:class:`~bctkit.run.benchmark.Run`: allocate, train the old model, then the new ones) or the
upgrade run (:class:`~bctkit.run.upgrade.UpgradeRun`: the old model is given), once or once per
allocation scenario with the combined summary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bctkit.data.allocation import Scenario
from bctkit.engine.distributed import is_main
from bctkit.errors import ConfigError
from bctkit.evaluation.report import report_dir, write_summary
from bctkit.run.benchmark import Run, stderr_log
from bctkit.run.config import RunConfig, for_scenario
from bctkit.run.upgrade import UpgradeRun

__all__ = ["run_pipeline", "run_scenarios"]


def run_pipeline(
    cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True,
    log: Callable[[str], None] = stderr_log, reuse_old_from: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the whole pipeline for ``cfg`` (with its scenario's overrides) into ``out``; returns the
    report dictionary. ``reuse_old_from``: a finished run of the same data, allocation and old
    model whose old model is copied in instead of training one (e.g. runs that differ only in
    ``new.train.seed``)."""
    if cfg.old.external:
        if reuse_old_from is not None:
            raise ConfigError(f"--reuse-old-from: old.source={cfg.old.source} already gives the old model")
        return UpgradeRun(for_scenario(cfg, "extended-data"), Path(out), resume, progress, log, None,
                          overwrite).execute()
    reuse = None if reuse_old_from is None else _old_model_file(Path(reuse_old_from))
    return Run(for_scenario(cfg, cfg.allocation.scenario), Path(out), resume, progress, log, reuse,
               overwrite).execute()


def _old_model_file(run_dir: Path) -> Path:
    """The finished old model of a ``reuse_old_from`` run directory (checked before anything trains)."""
    path = run_dir / "models" / "old" / "model.safetensors"
    if not path.exists():
        raise ConfigError(f"--reuse-old-from {run_dir}: no finished old model at {path}")
    return path


def run_scenarios(
    cfg: RunConfig, out: str | Path, scenarios: list[Scenario], resume: bool = False, progress: bool = True,
    log: Callable[[str], None] = stderr_log, reuse_old_from: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run the pipeline once per allocation scenario into ``out/<scenario>`` and write the combined
    table (UniBCT Table 2 layout) to ``out/summary.md`` and ``out/summary.json``.
    ``reuse_old_from``: an all-allocation run whose ``<scenario>/models/old`` are copied in."""
    out = Path(out)
    if cfg.old.external:
        raise ConfigError(f"--scenarios: old.source={cfg.old.source} trains on the given data as it is; "
                          "there are no allocations to run")
    # Every scenario's config (and old model to reuse) is checked before anything trains.
    subs = {scenario: for_scenario(cfg, scenario) for scenario in scenarios}
    reuse = {scenario: None if reuse_old_from is None else _old_model_file(Path(reuse_old_from) / scenario)
             for scenario in scenarios}
    reports = {}
    for scenario, sub in subs.items():
        if is_main():
            log(f"=== allocation {scenario} ===")
        run = Run(sub, out / scenario, resume, progress, log, reuse[scenario], overwrite)
        reports[scenario] = run.execute()
    if is_main():
        summary_dir = report_dir(out, cfg.evaluation.split)
        summary_dir.mkdir(parents=True, exist_ok=True)
        write_summary(summary_dir, reports, cfg.evaluation.fars)
    return reports

