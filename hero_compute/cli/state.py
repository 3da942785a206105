"""
``hero-compute state copy --from SRC --to DST``: move an explorer's state between
stores, e.g. its SQLite file into the PostgreSQL database explorers will share
(CONTRACT §10).  It works on the stores alone: no explorer is called, and none should
be running on either.
"""

from __future__ import annotations

import argparse
from typing import TextIO

from hero_compute.explorer.store import StoreError
from hero_compute.explorer.store.copy import copy_between

from . import exits


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """
    Add ``state copy``.

    :param sub: the subparsers action of the top parser
    :param common: the parent parser of the global options
    """
    state = sub.add_parser("state", help="the explorer's state store")
    actions = state.add_subparsers(dest="state_command", required=True, metavar="ACTION")
    copy = actions.add_parser(
        "copy",
        help="copy everything a store holds into a new one",
        description="Copy identities, secret hashes, tokens, revocations, node records "
        "and the audit log from one store into another, empty one. Stop the explorers "
        "first. A postgresql:// URI's password may also come from PGPASSWORD or "
        "PGPASSFILE; it is never printed.",
    )
    copy.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="DB",
        help="an SQLite file (e.g. explorer.db) or a postgresql:// URI",
    )
    copy.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="DB",
        help="an SQLite file or a postgresql:// URI, holding nothing yet",
    )


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    ``state copy``.

    :return: the exit status
    """
    try:
        source, target, counts = copy_between(args.source, args.target)
    except StoreError as e:
        err.write(f"hero-compute: {e}\n")
        return exits.FAILED
    total = ", ".join(f"{n} {table}" for table, n in counts.items())
    out.write(f"copied {source} -> {target}: {total}\n")
    return exits.OK
