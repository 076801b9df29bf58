"""``bctkit methods``: the compatibility methods and their options."""

from __future__ import annotations

import argparse
from typing import Any

NAMES = ("methods",)


def add_parser(sub: Any) -> None:
    """Register ``methods``."""
    sub.add_parser("methods", help="list the compatibility methods and their options")


def run(args: argparse.Namespace) -> int:
    from bctkit.losses.base import available_methods, method_class

    for name in available_methods():
        if name == "independent":  # the paragon every run trains; not a method to list in configs
            continue
        params = method_class(name).Params.model_fields
        opts = ", ".join(f"{k}={v.default!r}" for k, v in params.items()) or "no options"
        print(f"{name}: {opts}")
    return 0
