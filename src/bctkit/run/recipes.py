"""Recipes: packaged run configs that reproduce one paper's own experiment (docs/recipes.md).

A recipe is a packaged config (``bctkit/run/configs/NAME.yaml``) whose first line is
``# recipe: PAPER, EXPERIMENT``. Where it needs the user's data it says ``REQUIRED``; a run refuses
it at load time until every such value is given (``--set data.cifar.root=/data/cifar``), naming the
keys, so a recipe never starts on a path that is not there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bctkit.errors import ConfigError

__all__ = ["REQUIRED", "Recipe", "check_required", "list_recipes", "required_keys"]

REQUIRED = "REQUIRED"
CONFIGS = Path(__file__).parent / "configs"
MARK = "# recipe:"


@dataclass(frozen=True)
class Recipe:
    """A packaged recipe: its name (the config's), what it reproduces and the keys it needs."""

    name: str
    title: str
    required: tuple[str, ...]
    path: Path


def required_keys(tree: Any, prefix: str = "") -> list[str]:
    """Dotted keys of ``tree`` whose value is still :data:`REQUIRED`, in file order."""
    found: list[str] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += required_keys(value, f"{prefix}{key}.")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found += required_keys(value, f"{prefix}{i}.")
    elif tree == REQUIRED:
        found.append(prefix[:-1])
    return found


def check_required(tree: dict[str, Any], source: str) -> None:
    """Refuse a config that still holds a :data:`REQUIRED` value, naming every key to set."""
    keys = required_keys(tree)
    if keys:
        sets = " ".join(f"--set {k}=..." for k in keys)
        raise ConfigError(f"{source}: give the data this config needs: {sets} (see docs/recipes.md)")


def list_recipes() -> list[Recipe]:
    """Every packaged recipe, by name."""
    import yaml

    out = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        first = text.splitlines()[0] if text else ""
        if first.startswith(MARK):
            keys = tuple(required_keys(yaml.safe_load(text)))
            out.append(Recipe(path.stem, first[len(MARK):].strip(), keys, path))
    return out
