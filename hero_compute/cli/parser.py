"""
The argument parser: global options accepted before or after the command, and one
group of commands per module.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import hero_compute

from . import (
    audit,
    console,
    events,
    exits,
    explorer,
    images,
    nodes,
    state,
    tls,
    tokens,
    ui,
    vms,
)
from .connect import AddressError, parse_address

if TYPE_CHECKING:
    from .connect import Address


#: The global options' values when the command line gives none (``--explorer``'s comes
#: from the environment, see :func:`complete`).
DEFAULTS = {
    "json": False,
    "table": False,
    "timeout": None,
    "explorer": None,
    "ca": None,
    "cert": None,
    "key": None,
}


def addresses(text: str) -> list[Address]:
    """
    Coerce ``--explorer``/``HERO_EXPLORER``: one explorer URI, or a comma list of them
    (the CLI moves to the next when one cannot be reached).

    :return: a list of :class:`~hero_compute.rpc.addresses.Address`
    """
    try:
        return [parse_address(part.strip()) for part in text.split(",")]
    except AddressError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of seconds")
    return value


def common_options() -> argparse.ArgumentParser:
    """
    The global options as a parent parser, added to the top parser and to every command
    so that ``hero-compute nodes --json`` and ``hero-compute --json nodes`` agree.  Their
    default is :data:`argparse.SUPPRESS`: a command's parser then never overwrites what
    was given before the command.
    """
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument(
        "--explorer",
        type=addresses,
        metavar="URI[,URI...]",
        help="explorer address: unix:///path.sock, tcp://host:port, "
        "tls://host:port; a comma list tries the next when one cannot be reached "
        "[default: $HERO_EXPLORER or unix://$HERO_SOCKET_DIR/hero_compute_explorer.sock]",
    )
    common.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help="seconds allowed per call, instead of each operation's own "
        "(15 s for reads, 60 s vm start, 100 s vm stop/delete, 120 s vm "
        "create)",
    )
    common.add_argument(
        "--ca",
        metavar="PEM",
        help="the fleet CA, for a tls:// explorer [default: $HERO_CA]",
    )
    common.add_argument(
        "--cert",
        metavar="PEM|PREFIX",
        help="our client certificate for a tls:// explorer; a PREFIX alone "
        "means PREFIX.pem and PREFIX-key.pem [default: $HERO_CERT]",
    )
    common.add_argument(
        "--key",
        metavar="PEM",
        help="the certificate's key [default: $HERO_KEY, or from --cert]",
    )
    common.add_argument(
        "--json",
        action="store_true",
        help="print JSON (the default when stdout is not a terminal)",
    )
    common.add_argument(
        "--table",
        action="store_true",
        help="print tables even when stdout is not a terminal",
    )
    return common


def build(
    prog: str = "hero-compute", description: str | None = None
) -> argparse.ArgumentParser:
    """
    :param description: the text under the usage line
    :return: the top :class:`argparse.ArgumentParser`
    """
    common = common_options()
    top = argparse.ArgumentParser(
        prog=prog,
        description=description,
        parents=[common],
        epilog=exits.CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument(
        "--version", action="version", version=f"%(prog)s {hero_compute.__version__}"
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    nodes.add_commands(sub, common)
    console.add_commands(vms.add_commands(sub, common), common)
    images.add_commands(sub, common)
    explorer.add_commands(sub, common)
    tokens.add_commands(sub, common)
    ui.add_commands(sub, common)
    audit.add_commands(sub, common)
    events.add_commands(sub, common)
    state.add_commands(sub, common)
    tls.add_tls_commands(sub)
    return top


def complete(
    args: argparse.Namespace,
    default_explorer: Callable[[], str],
    env: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """
    Fill the global options that the command line left out.

    :param args: the parsed namespace
    :param default_explorer: ``() -> URI`` of the default explorer
    :param env: the environment, for ``HERO_CA``, ``HERO_CERT`` and ``HERO_KEY``
    :raise ValueError: the default explorer cannot be worked out, or the TLS files
        are incomplete
    """
    env = {} if env is None else env
    for name, value in DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    if args.explorer is None and env.get("HERO_EXPLORER"):
        try:
            args.explorer = addresses(env["HERO_EXPLORER"])
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"HERO_EXPLORER: {e}") from None
    if args.explorer is None:
        args.explorer = [parse_address(default_explorer())]
    args.ca = args.ca or env.get("HERO_CA") or None
    args.cert = args.cert or env.get("HERO_CERT") or None
    args.key = args.key or env.get("HERO_KEY") or None
    args.cert, args.key = certificate_files(args.cert, args.key)
    tls = [a for a in args.explorer if a.scheme == "tls"]
    if tls and args.ca is None:
        raise ValueError(
            f"{tls[0].uri} is a TLS explorer: give the fleet CA with "
            "--ca (or HERO_CA), and a client certificate with --cert"
        )
    return args


def certificate_files(cert: str | None, key: str | None) -> tuple[str | None, str | None]:
    """
    :param cert: ``--cert``: a certificate file, or a prefix (``PREFIX.pem`` and
        ``PREFIX-key.pem``, as ``hero-compute tls cert create`` writes them), or None
    :param key: ``--key``, or None to derive it from ``cert``
    :return: ``(cert file, key file)``, both None when no certificate is given
    """
    if cert is None:
        if key is not None:
            raise ValueError("--key needs --cert")
        return None, None
    if key is not None:
        return cert, key
    if cert.endswith(".pem"):
        return cert, cert[: -len(".pem")] + "-key.pem"
    return cert + ".pem", cert + "-key.pem"
