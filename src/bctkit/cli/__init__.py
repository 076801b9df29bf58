"""The command line, one module per command: argument parsing, printing and exit codes only; the
work is in the library. Errors: one line, exit 2."""

from bctkit.cli.main import main

__all__ = ["main"]
