"""
``hero-compute info``, and raw access: ``call NODE METHOD [PARAMS_JSON]`` and
``rpc METHOD [PARAMS_JSON]``.  Raw results are always JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

from .output import fields
from .units import ago

if TYPE_CHECKING:
    from rich.table import Table

    from .connect import Explorer
    from .output import Output


def params_json(text: str) -> dict[str, Any] | list[Any]:
    """
    Coerce the params argument: a JSON object (by name) or array (by position).

    :raise argparse.ArgumentTypeError: naming what is wrong
    """
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"params must be JSON: {e}") from None
    if not isinstance(value, (dict, list)):
        raise argparse.ArgumentTypeError("params must be a JSON object or array")
    return value


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """
    Add ``info``, ``call`` and ``rpc`` to the subcommands.

    :param sub: the subparsers action of the top parser
    :param common: the parent parser of the global options
    """
    info = sub.add_parser(
        "info",
        parents=[common],
        help="the explorer's version, uptime, listeners and node counts",
    )
    info.set_defaults(run=show_info)
    params_help = (
        'params as JSON: an object by name, e.g. \'{"vm_id": "abc"}\', '
        "or an array by position"
    )
    call = sub.add_parser(
        "call",
        parents=[common],
        help="call a node.* or vm.* method on a node (raw JSON)",
        description="Call a method on a node through the explorer; the "
        "result is printed as JSON.",
    )
    call.add_argument("node_id", metavar="NODE")
    call.add_argument("method", metavar="METHOD", help="e.g. node.info, vm.list")
    call.add_argument(
        "params", nargs="?", type=params_json, metavar="PARAMS_JSON", help=params_help
    )
    call.set_defaults(run=call_node)
    raw = sub.add_parser(
        "rpc",
        parents=[common],
        help="call a method of the explorer itself (raw JSON)",
        description="Call a method of the explorer; the result is printed as JSON.",
    )
    raw.add_argument("method", metavar="METHOD", help="e.g. explorer.info, rpc.discover")
    raw.add_argument(
        "params", nargs="?", type=params_json, metavar="PARAMS_JSON", help=params_help
    )
    raw.set_defaults(run=call_explorer)


def info_fields(info: dict[str, Any], now: float | None = None) -> Table:
    """:return: ``explorer.info`` as a key/value table"""
    nodes = info.get("nodes") or {}
    uptime = info.get("uptime_s")
    started = ago(time.time() - uptime, time.time()) if uptime is not None else "?"
    return fields(
        [
            ("version", info.get("version")),
            ("started", started),
            ("listeners", "\n".join(info.get("listeners") or []) or "-"),
            (
                "nodes",
                f"{nodes.get('online', 0)} online, {nodes.get('offline', 0)} offline",
            ),
        ]
    )


async def show_info(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``info``."""
    output.emit(await explorer.call("explorer.info"), info_fields)
    return 0


async def call_node(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``call NODE METHOD [PARAMS_JSON]``."""
    output.emit(await explorer.node_call(args.node_id, args.method, args.params))
    return 0


async def call_explorer(
    explorer: Explorer, args: argparse.Namespace, output: Output
) -> int:
    """``rpc METHOD [PARAMS_JSON]``."""
    output.emit(await explorer.call(args.method, args.params))
    return 0
