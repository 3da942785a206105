"""
``hero-compute image ...``: the base images of a node, and pulling one by URL.

``image pull`` asks the node to import the URL (``image.import`` answers at once), then
polls ``node.images`` until the image is ready or failed, with a progress bar on a
terminal; a failed import exits non-zero with the node's reason.
"""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text
from twisted.internet import task

from . import exits
from .output import fields, table
from .units import format_mb

if TYPE_CHECKING:
    from rich.table import Table

    from .connect import Explorer
    from .output import Output


#: Seconds between ``node.images`` polls during a pull.
POLL = 0.5

#: Polls in a row that may fail (a node briefly busy) before a pull gives up.
POLL_FAILURES = 10


def _sha256(text):
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 64 hex digits")
    return text.lower()


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """
    Add the ``image`` group to the subcommands.

    :param sub: the subparsers action of the top parser
    :param common: the parent parser of the global options
    """
    image = sub.add_parser(
        "image",
        parents=[common],
        help="base images of a node: list, pull by URL",
        description="The base images of nodes (NODE_IMAGE_DIRS), through the explorer.",
    )
    cmds = image.add_subparsers(dest="image_command", required=True, metavar="COMMAND")
    ls = cmds.add_parser("list", parents=[common], help="the images of a node")
    ls.add_argument("node_id", metavar="NODE")
    ls.set_defaults(run=list_images)
    pull = cmds.add_parser(
        "pull",
        parents=[common],
        help="download an http(s) URL onto a node as a base image",
        description="The node downloads URL into its first image directory, checking "
        "its SHA-256 as it streams; the image is usable once ready.",
    )
    pull.add_argument("node_id", metavar="NODE")
    pull.add_argument("url", metavar="URL")
    pull.add_argument(
        "--sha256", required=True, type=_sha256, metavar="HEX", help="expected digest"
    )
    pull.add_argument("--name", required=True, help="the image's file name on the node")
    pull.set_defaults(run=pull_image)


def _bytes(n: object) -> str:
    return format_mb(n / 2**20) if isinstance(n, int) else "-"


def images_table(images: list[dict[str, Any]]) -> Table:
    """:return: a table of ImageInfo"""
    rows = []
    for i in images:
        state = i.get("state")
        if state == "importing":
            total = i.get("bytes_total")
            done = _bytes(i.get("bytes_done"))
            state = f"importing {done}" + (f"/{_bytes(total)}" if total else "")
        colour = {"ready": "green", "failed": "red"}.get(str(i.get("state")), "yellow")
        rows.append(
            (
                i.get("name"),
                Text(str(state), style=colour),
                i.get("format") or "-",
                _bytes(i.get("size_bytes")),
                _bytes(i.get("virtual_size_bytes")),
                i.get("path"),
                i.get("error") or "",
            )
        )
    return table(("NAME", "STATE", "FORMAT", "SIZE", "VIRTUAL", "PATH", "ERROR"), rows)


def image_fields(image: dict[str, Any]) -> Table:
    """:return: one ImageInfo as a key/value table"""
    return fields(
        [
            ("name", image.get("name")),
            ("state", image.get("state")),
            ("format", image.get("format") or "-"),
            ("size", _bytes(image.get("size_bytes"))),
            ("virtual size", _bytes(image.get("virtual_size_bytes"))),
            ("path", image.get("path")),
        ]
    )


async def list_images(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``image list NODE``."""
    output.emit(await explorer.node_call(args.node_id, "node.images"), images_table)
    return 0


async def pull_image(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``image pull NODE URL --sha256 HEX --name NAME``."""
    params = {"url": args.url, "name": args.name, "sha256": args.sha256}
    await explorer.node_call(args.node_id, "image.import", params)
    console = Console(file=output.err)
    if console.is_terminal:
        columns = (
            TextColumn(f"pulling {args.name}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=True) as bar:
            bar_task = bar.add_task("pull", total=None)

            def show(image) -> None:
                bar.update(
                    bar_task,
                    completed=image.get("bytes_done") or 0,
                    total=image.get("bytes_total"),
                )

            image = await _wait(explorer, args, show)
    else:
        image = await _wait(explorer, args, lambda image: None)
    if image["state"] == "failed":
        raise exits.Failure(f"pulling {args.name} failed: {image.get('error')}")
    output.emit(image, image_fields)
    return 0


async def _wait(explorer, args, show):
    """
    Poll ``node.images`` until the import of ``args.name`` is over.

    :return: its ImageInfo, ready or failed
    :raise exits.Failure: when it is gone from the list (the node restarted)
    """
    failures = 0
    while True:
        try:
            images = await explorer.node_call(args.node_id, "node.images")
        except Exception:
            failures += 1
            if failures >= POLL_FAILURES:
                raise
            images = None
        if images is not None:
            failures = 0
            # The name may also be ready in another image directory: the import's
            # own entry, while it runs or once it failed, is the one to follow.
            mine = sorted(
                (i for i in images if i.get("name") == args.name),
                key=lambda i: (
                    ("importing", "failed").index(i["state"])
                    if i.get("state") in ("importing", "failed")
                    else 2
                ),
            )
            image = mine[0] if mine else None
            if image is None:
                raise exits.Failure(
                    f"the import of {args.name} is no longer listed on node "
                    f"{args.node_id} (did the node restart?)"
                )
            if image["state"] != "importing":
                return image
            show(image)
        await task.deferLater(explorer.reactor, POLL, lambda: None)
