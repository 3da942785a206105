"""
``hero-compute events [--follow] [--since N]``: the explorer's event stream
(``/v1/events``, CONTRACT §10), one JSON object a line.  Without ``--follow`` it prints
the events the explorer still holds (after ``--since``, default all) and exits; with it,
it goes on until interrupted, and when the explorer closes a slow reader (1008) it
resumes after the last event it printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from twisted.internet import defer, task

from . import exits
from .connect import HTTPRefusal

if TYPE_CHECKING:
    from .connect import Explorer
    from .output import Output


#: Seconds without a frame after which a replay (no ``--follow``) is taken as done.
QUIET = 0.5

#: The close code of a reader that fell behind: resume with ``since``.
TOO_SLOW = 1008


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """
    Add ``events``.

    :param sub: the subparsers action of the top parser
    :param common: the parent parser of the global options
    """
    events = sub.add_parser(
        "events",
        parents=[common],
        help="the explorer's events: nodes online/offline/removed/enrolled/revoked, VMs",
        description="Print the explorer's events, one JSON object a line.",
    )
    events.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new events"
    )
    events.add_argument(
        "--since", type=int, default=0, metavar="N", help="only events after seq N [0]"
    )
    events.set_defaults(run=show_events)


class _Printer:
    """The stream's handler: each frame a line on stdout."""

    def __init__(self, clock, follow) -> None:
        self._clock = clock
        self._follow = follow
        self.last = None
        self.done: defer.Deferred = defer.Deferred()
        self._quiet = None

    def opened(self, socket) -> None:
        self.socket = socket
        self._rearm()

    def _rearm(self) -> None:
        if self._follow:
            return
        if self._quiet is not None and self._quiet.active():
            self._quiet.cancel()
        self._quiet = self._clock.callLater(QUIET, self._stop)

    def _stop(self) -> None:
        self.socket.close()
        if not self.done.called:
            self.done.callback(None)

    def received(self, data) -> None:
        line = data.decode("utf-8")
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        try:
            self.last = json.loads(line)["seq"]
        except (ValueError, KeyError, TypeError):
            pass
        self._rearm()

    def closed(self, code) -> None:
        if self._quiet is not None and self._quiet.active():
            self._quiet.cancel()
        if not self.done.called:
            self.done.callback(code)


async def show_events(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``events``."""
    since = args.since
    while True:
        printer = _Printer(explorer.reactor, args.follow)
        try:
            await explorer.events(since, printer)
        except HTTPRefusal as e:
            raise exits.Failure(f"events refused: {e.message}", exits.FAILED) from None
        code = await printer.done
        if printer.last is not None:
            since = printer.last
        if not args.follow:
            return exits.OK
        if code != TOO_SLOW:
            raise exits.Failure(
                f"the explorer closed the event stream (code {code})", exits.UNREACHABLE
            )
        await task.deferLater(explorer.reactor, 0, lambda: None)
