"""
``hero-compute token create [--ttl 1h] [--node-id ID]``: a single-use join token from
the explorer (over its Unix socket, or with a client certificate), printed on one line.
"""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .connect import Explorer
    from .output import Output


#: Seconds in each unit ``--ttl`` accepts.
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """
    Coerce a duration: seconds, or a number with ``s``, ``m``, ``h`` or ``d``.

    :raise argparse.ArgumentTypeError: for anything else
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a duration such as 90, 30m, 1h or 7d"
        )
    return float(match.group(1)) * UNITS[match.group(2)]


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """
    Add ``token create``.

    :param sub: the subparsers action of the top parser
    :param common: the parent parser of the global options
    """
    token = sub.add_parser("token", parents=[common], help="join tokens for new nodes")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        parents=[common],
        help="make a single-use join token",
        description="Ask the explorer for a single-use join token and print it on one "
        "line. A node enrolls with it (NODE_JOIN_TOKEN, with NODE_CA_PIN).",
    )
    create.add_argument(
        "--ttl",
        type=duration,
        default=3600.0,
        metavar="DURATION",
        help="how long it stays valid: seconds, or 30m, 1h, 7d [default: 1h]",
    )
    create.add_argument(
        "--node-id",
        metavar="ID",
        help="the only node id it may enroll [default: any new node]",
    )
    create.set_defaults(run=create_token)


async def create_token(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``token create``."""
    params = {"ttl": args.ttl}
    if args.node_id is not None:
        params["node_id"] = args.node_id
    made = await explorer.call("explorer.create_token", params)
    if args.json:
        output.json(made)
    else:
        output.out.write(made["token"] + "\n")
    return 0
