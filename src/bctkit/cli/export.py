"""``bctkit export MODEL --format F --out DIR``: the embedding network for serving, with its card."""

from __future__ import annotations

import argparse
import sys
from typing import Any

NAMES = ("export",)


def add_parser(sub: Any) -> None:
    """Register ``export``."""
    exp = sub.add_parser("export", help="export a model's embedding network (no classifier head) for "
                                        "serving, checked against the model, with a JSON card")
    exp.add_argument("model", help="bctkit model file (RUN/models/<name>/model.safetensors) or its folder")
    exp.add_argument("--format", required=True, metavar="FORMAT",
                     help="onnx (needs pip install bctkit[onnx]), torchscript or safetensors (weights only)")
    exp.add_argument("--out", required=True, help="folder for the exported file and card.json")


def run(args: argparse.Namespace) -> int:
    """Export; a one-line warning on stderr when the model's compatibility criterion failed (exporting
    is still allowed: e.g. to serve a gallery the new model re-embedded in full)."""
    from bctkit.export import export_model
    from bctkit.storage import read_json

    files = export_model(args.model, args.format, args.out)
    card = read_json(files.card)
    check = card["exports"][args.format]["check"]
    print(f"export: {files.file} (max abs difference from the model {check['max_abs_diff']:.2g}); "
          f"card: {files.card}")
    compat = card["compatibility"]
    if compat["criterion"]["passed"] is False:
        crit = compat["criterion"]
        print(f"bctkit: warning: {card['model']['name']}'s compatibility criterion failed ({crit['metric']} "
              f"cross {crit['cross']} vs {compat['trained_against']}'s own {crit['old_self']}, "
              f"{crit['source']}): do not search {compat['trained_against']}'s gallery with it; exported "
              "for a gallery it embeds itself", file=sys.stderr)
    return 0
