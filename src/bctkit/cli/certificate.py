"""``bctkit certificate verify FILE...``: check compatibility certificates."""

from __future__ import annotations

import argparse
from typing import Any

NAMES = ("certificate",)


def add_parser(sub: Any) -> None:
    """Register ``certificate verify``."""
    cert = sub.add_parser("certificate", help="check compatibility certificates (RUN/certificates/*.json)")
    cert_sub = cert.add_subparsers(dest="certificate_command", required=True)
    verify = cert_sub.add_parser("verify", help="verify certificate files: exit 0 if all verify, 2 otherwise")
    verify.add_argument("files", nargs="+", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    """One line per certificate file: OK with what it certifies, or the error; 0 if all verify, else 2."""
    from bctkit.evaluation.certificate import CertificateError, describe, verify_certificate

    failed = 0
    for path in args.files:
        try:
            print(f"OK {path}: {describe(verify_certificate(path))}")
        except CertificateError as exc:
            failed += 1
            print(f"FAILED {exc}")
    return 2 if failed else 0
