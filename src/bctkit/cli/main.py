"""``bctkit``: the parser made of one module per command (each with ``add_parser`` and ``run``),
the dispatch, and the error form every command shares: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from bctkit.cli import aggregate, certificate, evaluate, export, extract, gallery, methods, recipes, run
from bctkit.engine.distributed import close_process_group, is_distributed, rank
from bctkit.errors import BctkitError

# Each command module registers its subcommand(s) and carries them out; order = order in --help.
COMMANDS: tuple[ModuleType, ...] = (run, evaluate, aggregate, export, extract, methods, certificate, gallery,
                                    recipes)


class _Parser(argparse.ArgumentParser):
    """argparse with bctkit's error form: one line on stderr, exit 2 (argparse's own prints the usage
    block first). Subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    """The whole command line: every command module's subcommands."""
    p = _Parser(prog="bctkit", description="Backward-compatible embedding training.")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return p


def _module_of(command: str) -> ModuleType:
    return next(m for m in COMMANDS if command in m.NAMES)


def _where() -> str:
    """'rank N: ' under several processes (each rank may fail on its own share), else ''."""
    return f"rank {rank()}: " if is_distributed() else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Under torchrun every process runs this; a failing rank prints its one-line error and exits 2,
    and torchrun then stops the other ranks (none waits forever on a collective)."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or an argument error already printed on one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        code = _module_of(args.command).run(args)
        close_process_group()
        return code
    except BctkitError as exc:
        print(f"bctkit: error: {_where()}{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"bctkit: error: {_where()}{exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bctkit: interrupted; rerun with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130
