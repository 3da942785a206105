"""
``hero-compute audit [--node NODE] [--limit N] [--since T]``: who changed what in the
fleet, newest first (``explorer.audit``, CONTRACT §10).
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from .output import table
from .units import ago

if TYPE_CHECKING:
    from rich.table import Table

    from .connect import Explorer
    from .output import Output


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """
    Add ``audit``.

    :param sub: the subparsers action of the top parser
    :param common: the parent parser of the global options
    """
    audit = sub.add_parser(
        "audit",
        parents=[common],
        help="the audit log: who changed what, newest first",
        description="Changes made through the explorers of this store (tokens, "
        "enrollments, revocations, removals, placements, VM writes), newest first.",
    )
    audit.add_argument("--node", metavar="NODE", help="only changes to this node id")
    audit.add_argument(
        "--limit", type=int, default=100, metavar="N", help="at most N entries [100]"
    )
    audit.add_argument(
        "--since", type=float, metavar="UNIX_TIME", help="only entries since then"
    )
    audit.set_defaults(run=show_audit)


def audit_table(page: dict[str, Any]) -> Table:
    """:return: ``explorer.audit``'s entries as a table"""
    now = time.time()
    return table(
        ["WHEN", "CALLER", "METHOD", "TARGET", "OUTCOME", "EXPLORER"],
        [
            (
                ago(e["time"], now),
                e["caller"],
                e["method"],
                e["target"] or "-",
                e["outcome"],
                e["explorer"],
            )
            for e in page["entries"]
        ],
    )


async def show_audit(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``audit``."""
    params = {"limit": args.limit}
    if args.node is not None:
        params["node_id"] = args.node
    if args.since is not None:
        params["since"] = args.since
    output.emit(await explorer.call("explorer.audit", params), audit_table)
    return 0
