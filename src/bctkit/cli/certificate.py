"""``bctkit certificate verify FILE...``: check compatibility certificates."""

from __future__ import annotations

import argparse
from typing import Any

NAMES = ("certificate",)


CLAIM_FAILED = 3


def add_parser(sub: Any) -> None:
    """Register ``certificate verify``."""
    cert = sub.add_parser("certificate", help="check compatibility certificates (RUN/certificates/*.json)")
    cert_sub = cert.add_subparsers(dest="certificate_command", required=True)
    verify = cert_sub.add_parser(
        "verify", help="verify certificate files: exit 0 if all are valid and passed, 3 if all are valid "
                       "but a claim failed, 2 if any file is invalid",
        description="One line per file. Exit codes (the worst file decides): 0 every certificate is valid "
                    "and its claim passed; 3 every certificate is valid but at least one claim failed "
                    "(the new model is not compatible); 2 at least one file is invalid (unreadable, "
                    "malformed or edited).")
    verify.add_argument("files", nargs="+", metavar="FILE")


def run(args: argparse.Namespace) -> int:
    """One line per certificate file: OK (valid, passed), CLAIM FAILED (valid, failed) or FAILED (invalid)
    with the reason; exit 0, 3 or 2, the worst file winning (2 over 3 over 0), so a CI gate can use it."""
    from bctkit.evaluation.certificate import CertificateError, describe, verify_certificate

    code = 0
    for path in args.files:
        try:
            cert = verify_certificate(path)
        except CertificateError as exc:
            code = 2
            print(f"FAILED {exc}")
            continue
        if cert["passed"]:
            print(f"OK {path}: {describe(cert)}")
        else:
            code = code or CLAIM_FAILED
            print(f"CLAIM FAILED {path}: {describe(cert)}")
    return code
