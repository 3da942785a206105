"""
The argument parser: global options accepted before or after the command, and one
group of commands per module.
"""

import argparse

import hero_compute

from . import exits, explorer, nodes, tls, vms
from .connect import AddressError, parse_address

#: The global options' values when the command line gives none (``--explorer``'s comes
#: from the environment, see :func:`complete`).
DEFAULTS = {"json": False, "table": False, "timeout": None, "explorer": None}


def _address(text):
    try:
        return parse_address(text)
    except AddressError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of seconds")
    return value


def common_options():
    """
    The global options as a parent parser, added to the top parser and to every command
    so that ``hero-compute nodes --json`` and ``hero-compute --json nodes`` agree.  Their
    default is :data:`argparse.SUPPRESS`: a command's parser then never overwrites what
    was given before the command.
    """
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--explorer", type=_address, metavar="URI",
                        help="explorer address: unix:///path.sock, tcp://host:port "
                        "[default: unix://$HERO_SOCKET_DIR/hero_compute_explorer.sock]")
    common.add_argument("--timeout", type=_seconds, metavar="S",
                        help="seconds allowed per call, instead of each operation's own "
                        "(15 s for reads, 60 s vm start, 100 s vm stop/delete, 120 s vm "
                        "create)")
    common.add_argument("--json", action="store_true",
                        help="print JSON (the default when stdout is not a terminal)")
    common.add_argument("--table", action="store_true",
                        help="print tables even when stdout is not a terminal")
    return common


def build(prog="hero-compute", description=None):
    """
    :param description: the text under the usage line
    :return: the top :class:`argparse.ArgumentParser`
    """
    common = common_options()
    top = argparse.ArgumentParser(
        prog=prog, description=description, parents=[common], epilog=exits.CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version",
                     version=f"%(prog)s {hero_compute.__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    nodes.add_commands(sub, common)
    vms.add_commands(sub, common)
    explorer.add_commands(sub, common)
    tls.add_tls_commands(sub)
    return top


def complete(args, default_explorer):
    """
    Fill the global options that the command line left out.

    :param args: the parsed namespace
    :param default_explorer: ``() -> URI`` of the default explorer
    :raise ValueError: the default explorer cannot be worked out
    """
    for name, value in DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    if args.explorer is None:
        args.explorer = parse_address(default_explorer())
    return args
