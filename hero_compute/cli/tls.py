"""
``hero-compute tls``: the offline PKI commands (contract §6), like ``nomad tls``.

    hero-compute tls ca create [--dir DIR] [--trust-domain TD] [--days 3650] [--force]
    hero-compute tls cert create --ca-dir DIR (--explorer NAME | --node NODE_ID |
                                 --client NAME) [--dns N]... [--ip A]... [--days 90]
                                 [--out PREFIX] [--force]
    hero-compute tls pin CA.pem

They work on files only, never on the network.  Errors are one line on stderr; exit
status 1 for a problem with files (missing CA, a file in the way), 64 for a bad value.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from hero_compute import pki


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        days = 0
    if days < 1:
        raise argparse.ArgumentTypeError(f"invalid days {text!r}: a whole number >= 1")
    return days


def add_tls_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """
    Add the ``tls`` command group to the ``hero-compute`` parser.

    :param subparsers: the object ``add_subparsers()`` returned; commands it adds carry
        a ``tls_run`` default, the function that runs them (see :func:`run`)
    """
    tls = subparsers.add_parser("tls", help="offline PKI: the fleet CA and certificates")
    groups = tls.add_subparsers(dest="tls_group", required=True)

    ca = groups.add_parser("ca", help="the fleet CA").add_subparsers(
        dest="tls_command", required=True
    )
    create = ca.add_parser("create", help="create the fleet CA; prints its pin")
    create.add_argument(
        "--dir",
        default=".",
        help="where to write ca.pem and ca-key.pem (created when "
        "missing) [default: the current directory]",
    )
    create.add_argument(
        "--trust-domain",
        default=pki.DEFAULT_TRUST_DOMAIN,
        help=f"the fleet's SPIFFE trust domain [default: {pki.DEFAULT_TRUST_DOMAIN}]",
    )
    create.add_argument("--days", type=_days, default=3650, help="validity [default: 3650]")
    create.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA (its certificates stop being trusted)",
    )
    create.set_defaults(tls_run=_ca_create)

    cert = groups.add_parser("cert", help="identity certificates").add_subparsers(
        dest="tls_command", required=True
    )
    create = cert.add_parser("create", help="issue a certificate and key with the CA")
    create.add_argument(
        "--ca-dir", required=True, help="the directory of ca.pem, ca-key.pem"
    )
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument("--explorer", metavar="NAME", help="an explorer's certificate")
    who.add_argument("--node", metavar="NODE_ID", help="a node's certificate")
    who.add_argument("--client", metavar="NAME", help="an operator's or script's")
    create.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name to add (repeatable)",
    )
    create.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="an IP address to add (repeatable)",
    )
    create.add_argument("--days", type=_days, default=90, help="validity [default: 90]")
    create.add_argument(
        "--out",
        metavar="PREFIX",
        help="write PREFIX.pem and PREFIX-key.pem "
        "[default: <role>-<name> in the current directory]",
    )
    create.add_argument("--force", action="store_true", help="replace existing files")
    create.set_defaults(tls_run=_cert_create)

    pin = groups.add_parser("pin", help="print a CA certificate's pin")
    pin.add_argument("ca_file", metavar="CA.pem")
    pin.set_defaults(tls_run=_pin)


def _ca_create(args: argparse.Namespace, out: TextIO) -> None:
    pin = pki.create_ca(args.dir, args.trust_domain, days=args.days, force=args.force)
    print(pin, file=out)


def _cert_create(args: argparse.Namespace, out: TextIO) -> None:
    role, name = next(
        (role, getattr(args, role)) for role in pki.ROLES if getattr(args, role) is not None
    )
    paths = pki.create_cert(
        args.ca_dir,
        role,
        name,
        dns=args.dns,
        ips=args.ip,
        days=args.days,
        out=args.out,
        force=args.force,
    )
    for path in paths:
        print(path, file=out)


def _pin(args: argparse.Namespace, out: TextIO) -> None:
    print(pki.spki_pin(pki.load_certificate(args.ca_file)), file=out)


def run(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """
    Run a parsed ``tls`` command.

    :return: the exit status: 0, 1 (files: a missing CA, a file in the way) or 64 (a bad
        name, address or trust domain)
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        args.tls_run(args, out)
    except pki.IdentityError as e:
        print(f"hero-compute tls: {e}", file=err)
        return 64
    except pki.PkiError as e:
        print(f"hero-compute tls: {e}", file=err)
        return 1
    except OSError as e:
        print(f"hero-compute tls: {e.filename or ''}: {e.strerror}", file=err)
        return 1
    return 0
