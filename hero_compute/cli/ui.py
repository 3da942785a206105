"""
``hero-compute ui token create --user NAME --role viewer|operator [--ttl 8h]``,
``ui token list`` and ``ui token revoke --user NAME``: the dashboard's accounts
(CONTRACT §11), made over the explorer's Unix socket or with a client certificate.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from .output import table
from .tokens import duration

if TYPE_CHECKING:
    from .connect import Explorer
    from .output import Output


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """
    Add ``ui token create|list|revoke``.

    :param sub: the subparsers action of the top parser
    :param common: the parent parser of the global options
    """
    ui = sub.add_parser("ui", parents=[common], help="the dashboard's accounts")
    groups = ui.add_subparsers(dest="ui_command", required=True, metavar="GROUP")
    token = groups.add_parser(
        "token", parents=[common], help="login tokens for dashboard users"
    )
    actions = token.add_subparsers(dest="ui_token_command", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        parents=[common],
        help="make a single-use login URL for a user",
        description="Ask the explorer for a single-use dashboard login token for a "
        "user with a role, and print its login URL (the token alone when the explorer "
        "runs no dashboard). The session it opens ends when the token would have.",
    )
    create.add_argument("--user", required=True, metavar="NAME", help="the user's name")
    create.add_argument(
        "--role",
        required=True,
        choices=("viewer", "operator"),
        help="viewer: looks; operator: also creates, starts, stops and deletes VMs",
    )
    create.add_argument(
        "--ttl",
        type=duration,
        default=8 * 3600.0,
        metavar="DURATION",
        help="how long the token (and its session) lasts: seconds, or 30m, 8h, 7d "
        "[default: 8h]",
    )
    create.set_defaults(run=create_ui_token)
    listing = actions.add_parser(
        "list",
        parents=[common],
        help="users with unused tokens or live sessions (never a token)",
    )
    listing.set_defaults(run=list_ui_tokens)
    revoke = actions.add_parser(
        "revoke",
        parents=[common],
        help="end a user's tokens and live sessions",
    )
    revoke.add_argument("--user", required=True, metavar="NAME", help="the user's name")
    revoke.set_defaults(run=revoke_ui_user)


async def create_ui_token(
    explorer: Explorer, args: argparse.Namespace, output: Output
) -> int:
    """``ui token create``."""
    made = await explorer.call(
        "explorer.ui_token_create",
        {"user": args.user, "role": args.role, "ttl": args.ttl},
    )
    if args.json:
        output.json(made)
    else:
        output.out.write((made.get("url") or made["token"]) + "\n")
    return 0


def _expiry(value):
    if value is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))


async def list_ui_tokens(
    explorer: Explorer, args: argparse.Namespace, output: Output
) -> int:
    """``ui token list``."""
    listed = await explorer.call("explorer.ui_token_list", {})
    rows = [
        (e["user"], e["role"], kind, _expiry(e["expires_at"]))
        for kind, key in (("token", "tokens"), ("session", "sessions"))
        for e in listed[key]
    ]
    output.emit(listed, lambda _: table(("USER", "ROLE", "KIND", "EXPIRES"), rows))
    return 0


async def revoke_ui_user(
    explorer: Explorer, args: argparse.Namespace, output: Output
) -> int:
    """``ui token revoke``."""
    ended = await explorer.call("explorer.ui_token_revoke", {"user": args.user})
    if args.json:
        output.json(ended)
    else:
        output.out.write(
            f"{args.user}: {ended['tokens']} tokens and {ended['sessions']} sessions "
            "ended\n"
        )
    return 0
