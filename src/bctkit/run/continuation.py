"""The finished models a run finds: reused when their config key is this run's (in its folder, or
another run's with ``--reuse-old-from``), continued to more epochs (``--resume`` after only
``train.epochs`` grew), or else never replaced without ``--overwrite``.

A model's ``config_key`` is the run key of the configuration it was trained with (what a run
compares to decide reuse); its ``run_id`` is that key for a model trained in one go, and a hash of
the key and the earlier stages (``continued_from``) for a continued one, since its first epochs ran
under the shorter run's learning-rate schedule and its weights differ from a model trained from
scratch for as many epochs. Its checkpoints carry the same run id, so an interrupted continuation
resumes as one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bctkit.engine.distributed import barrier, is_main
from bctkit.errors import ConfigError, FileFormatError
from bctkit.models.heads import HeadConfig
from bctkit.models.store import LoadedModel, load_model, save_model
from bctkit.run.config import RunConfig
from bctkit.run.keys import config_differences, run_key
from bctkit.storage.tensors import read_header
from bctkit.training import TrainConfig

KeyOf = Callable[[TrainConfig], str]
"""The run key of a model trained with a given training config (the rest of the key fixed)."""

ONLY_EPOCHS = "with --resume, only a larger train.epochs continues a finished model"


@dataclass(frozen=True)
class Continuation:
    """A finished model of ``epochs`` epochs that this run trains further. ``extends``: the finished
    model's run id, which its final checkpoint carries (None: the checkpoint is an interrupted run of
    this continuation, which resumes as any interrupted run)."""

    epochs: int
    extends: str | None
    run_id: str  # the continued model's run id
    continued_from: list[dict[str, Any]]  # every earlier stage, oldest first
    train_seconds: float  # the earlier stages' training time


def stored_key(meta: dict[str, Any]) -> str | None:
    """The config key a stored model was trained for (a model saved before continuations existed
    has only its run id, which was that key)."""
    key = meta.get("config_key") or meta.get("run_id")
    return None if key is None else str(key)


def file_key(path: Path) -> str | None:
    """:func:`stored_key` of a model file, from its header (None when unreadable)."""
    try:
        return stored_key(read_header(path)[1])
    except FileFormatError:
        return None


def staged_run_id(config_key: str, continued_from: list[dict[str, Any]]) -> str:
    """The run id of a model with config key ``config_key`` reached through ``continued_from``."""
    return run_key({"config": config_key, "continued_from": continued_from}) if continued_from else config_key


def plan_continuation(meta: dict[str, Any], train_cfg: TrainConfig, key_of: KeyOf, ckpt: Path,
                      overwrite: bool) -> Continuation | None:
    """How the finished model ``meta`` continues to ``train_cfg`` from its checkpoint ``ckpt``: when
    its configuration differs from this one only in fewer ``train.epochs``; None otherwise. A model
    that could continue but whose checkpoint is neither its final one nor an interrupted run of
    this continuation is a ConfigError, or None with ``overwrite`` (it trains from scratch)."""
    try:
        epochs = int(meta["train"]["epochs"])
        finished = str(meta["run_id"])
    except (KeyError, TypeError, ValueError):
        return None
    shorter = train_cfg.model_copy(update={"epochs": epochs})
    if epochs >= train_cfg.epochs or key_of(shorter) != stored_key(meta):
        return None
    stages = [*(meta.get("continued_from") or []), {"epochs": epochs, "run_id": finished}]
    run_id = staged_run_id(key_of(train_cfg), stages)
    try:
        saved = read_header(ckpt)[1]
    except FileFormatError:
        saved = {}
    if saved.get("run_id") == run_id:  # an interrupted continuation
        extends = None
    elif saved.get("run_id") == finished and saved.get("epoch") == epochs and not saved.get("step"):
        extends = finished
    elif overwrite:
        return None
    else:
        raise ConfigError(
            f"{ckpt.parent}: the finished model can be continued to {train_cfg.epochs} epochs only from its "
            f"final checkpoint {ckpt.name}, which is {'of another run' if ckpt.exists() else 'missing'}; "
            "use another --out, or --overwrite to train it from scratch")
    return Continuation(epochs, extends, run_id, stages, float(meta.get("train_seconds") or 0.0))


def adopt(src: Path, key: str, dest: Path) -> LoadedModel:
    """The finished old model ``src`` of another run (``--reuse-old-from``), copied to ``dest`` in
    this run. It must have been trained on this run's data and allocation with this run's old-model
    config (``key``)."""
    loaded = load_model(src)
    if stored_key(loaded.meta) != key:
        raise ConfigError(
            f"--reuse-old-from {src.parents[2]}: {src} was trained on other data, another allocation "
            f"or another old-model config than this run's (run id {stored_key(loaded.meta)}, "
            f"this run needs {key})"
        )
    if src.resolve() != dest.resolve() and is_main():
        save_model(dest, loaded.backbone, loaded.head, HeadConfig(**loaded.meta["head"]), loaded.meta)
    barrier()
    return loaded


def refuse_replacing(name: str, path: Path, key: str, previous: dict[str, Any] | None, cfg: RunConfig,
                     continued: list[str]) -> None:
    """A finished model of another configuration (``previous``: the run folder's config before this
    run) is never replaced without ``--overwrite``; ``continued``: the models this run continued."""
    stored = file_key(path)
    if stored is None or stored == key:
        return
    diff = config_differences(previous, cfg) if previous else []
    more = " ..." if len(diff) > 5 else ""
    what = f" (the run's config differs in {', '.join(diff[:5])}{more})" if diff else ""
    grown = (f"; this run continued {', '.join(continued)}, and models trained against a continued model "
             "must be trained again" if continued else "")
    raise ConfigError(
        f"{path} is the finished {name} model of another configuration{what}; it would be replaced "
        f"({ONLY_EPOCHS}{grown}): use another --out, or --overwrite to replace it")
