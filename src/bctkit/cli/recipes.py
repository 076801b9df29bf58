"""``bctkit recipes [NAME]``: the packaged recipes that reproduce the papers' experiments (a table:
name, what it reproduces, the data keys to give), or one recipe's config file to read or copy."""

from __future__ import annotations

import argparse
from typing import Any

from bctkit.errors import ConfigError

NAMES = ("recipes",)


def add_parser(sub: Any) -> None:
    """Register ``recipes``."""
    p = sub.add_parser("recipes", help="the papers' experiments as packaged run configs: list them, or print "
                                       "one (run it with bctkit run NAME --set KEY=PATH ... --out DIR)")
    p.add_argument("name", nargs="?", help="print this recipe's config")


def run(args: argparse.Namespace) -> int:
    from bctkit.run.recipes import list_recipes

    recipes = {r.name: r for r in list_recipes()}
    if args.name is not None:
        if args.name not in recipes:
            raise ConfigError(f"recipe {args.name!r}: expected one of {sorted(recipes)}")
        print(recipes[args.name].path.read_text(encoding="utf-8"), end="")
        return 0
    for r in recipes.values():
        print(f"{r.name}: {r.title}")
        print(f"    bctkit run {r.name} " + " ".join(f"--set {k}=PATH" for k in r.required) + " --out DIR")
    print("details, data layouts and the papers' numbers: docs/recipes.md")
    return 0
