"""
``hero-compute nodes`` and ``hero-compute node ID``: the fleet as the explorer sees it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .connect import MethodNotFound
from .output import fields, styled_state, table
from .units import ago, format_mb

if TYPE_CHECKING:
    from rich.table import Table

    from .connect import Explorer
    from .output import Output


#: Nodes asked for per ``explorer.query_nodes`` page.
PAGE = 1000


def label(text: str) -> tuple[str, str]:
    """Coerce a ``KEY=VALUE`` label filter (``--where``, ``--label``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: a label filter is KEY=VALUE")
    return key, value


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """
    Add ``nodes`` and ``node`` to the subcommands.

    :param sub: the subparsers action of the top parser
    :param common: the parent parser of the global options
    """
    nodes = sub.add_parser(
        "nodes",
        parents=[common],
        help="list nodes",
        description="List the explorer's nodes (all pages).",
    )
    nodes.add_argument("--status", choices=("online", "offline"))
    nodes.add_argument(
        "--where",
        "--label",
        dest="label",
        type=label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only nodes with this label (repeat: all must match)",
    )
    nodes.set_defaults(run=list_nodes)
    node = sub.add_parser(
        "node",
        parents=[common],
        help="one node's record",
        description="Show one node as the explorer knows it.",
    )
    node.add_argument("node_id", metavar="ID")
    node.set_defaults(run=show_node)


async def fetch_nodes(
    call: Callable[[str, Any], Awaitable[Any]],
    status: str | None = None,
    labels: dict[str, str] | None = None,
    page: int = PAGE,
) -> list[dict[str, Any]]:
    """
    Every node matching the filters: through ``explorer.query_nodes`` page by page, or
    ``explorer.list_nodes`` from an explorer that predates it (labels filtered here).

    :param call: ``async call(method, params)`` on the explorer
    :param status: ``online``, ``offline`` or None
    :param labels: a dict the nodes' labels must contain, or None
    :return: the list of NodeInfo
    """
    query: dict[str, Any] = {"limit": page}
    if status:
        query["status"] = status
    if labels:
        query["labels"] = labels
    nodes, cursor = [], None
    try:
        while True:
            params = dict(query, cursor=cursor) if cursor is not None else query
            answer = await call("explorer.query_nodes", params)
            nodes.extend(answer["nodes"])
            cursor = answer.get("next_cursor")
            if not cursor:
                return nodes
    except MethodNotFound:
        if nodes:
            raise
    listed = await call("explorer.list_nodes", {"status": status} if status else None)
    wanted = (labels or {}).items()
    return [n for n in listed if wanted <= (n.get("labels") or {}).items()]


def used_of(node: dict[str, Any], key: str, fmt: Callable[[Any], str] = str) -> str:
    """
    :return: ``used/total`` of one resource of a node, e.g. ``2/8`` or ``512M/16G``
    """
    used = (node.get("usage") or {}).get(key)
    total = (node.get("capacity") or {}).get(key)
    if used is None and total is None:
        return "-"
    return f"{fmt(used) if used is not None else '?'}/{fmt(total) if total else '?'}"


def _gb(value: object) -> str:
    return format_mb(value * 1024) if isinstance(value, (int, float)) else "?"


def _by_name(node: dict[str, Any]) -> tuple[str, str]:
    return str(node.get("name")), str(node.get("node_id"))


def nodes_table(nodes: list[dict[str, Any]], now: float | None = None) -> Table:
    """:return: the ``nodes`` table"""
    now = time.time() if now is None else now
    rows = [
        (
            n.get("name"),
            n.get("node_id"),
            styled_state(n.get("status")),
            n.get("transport"),
            n.get("socket_path"),
            str(n.get("vm_count", 0)),
            used_of(n, "vcpus"),
            used_of(n, "memory_mb", format_mb),
            used_of(n, "disk_gb", _gb),
            ago(n.get("last_seen"), now),
        )
        for n in sorted(nodes, key=_by_name)
    ]
    return table(
        (
            "NAME",
            "ID",
            "STATUS",
            "TRANSPORT",
            "ADDRESS",
            "VMS",
            "VCPUS",
            "MEMORY",
            "DISK",
            "LAST SEEN",
        ),
        rows,
    )


def node_fields(node: dict[str, Any], now: float | None = None) -> Table:
    """:return: one node's record as a key/value table"""
    now = time.time() if now is None else now
    labels = node.get("labels") or {}
    return fields(
        [
            ("name", node.get("name")),
            ("id", node.get("node_id")),
            ("status", styled_state(node.get("status"))),
            ("address", node.get("socket_path")),
            ("transport", node.get("transport")),
            ("version", node.get("version")),
            ("VMs", node.get("vm_count")),
            ("vCPUs", used_of(node, "vcpus")),
            ("memory", used_of(node, "memory_mb", format_mb)),
            ("disk", used_of(node, "disk_gb", _gb)),
            ("last seen", ago(node.get("last_seen"), now)),
            ("first seen", ago(node.get("first_seen"), now)),
            ("labels", ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"),
        ]
    )


async def list_nodes(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``nodes``: every node, as a table or JSON."""
    nodes = await fetch_nodes(explorer.call, args.status, dict(args.label) or None)
    output.emit(nodes, nodes_table)
    return 0


async def show_node(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``node ID``: one node."""
    output.emit(
        await explorer.call("explorer.get_node", {"node_id": args.node_id}), node_fields
    )
    return 0


async def last_seen(explorer: Explorer, node_id: str) -> str | None:
    """
    :return: ``last seen 3 min ago`` for a node, or None when the explorer cannot say
    """
    try:
        node = await explorer.call("explorer.get_node", {"node_id": node_id})
    except Exception:  # only a nicer message is lost; the original error still shows
        return None
    return f"last seen {ago(node.get('last_seen'), time.time())}"
