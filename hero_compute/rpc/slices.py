"""
Long scans cut into slices, one slice per reactor turn, so that a sweep over a whole
fleet (100,000 node records, 20,000 connections: about 10 ms each in one go) never holds
the reactor long enough to show in a heartbeat's latency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

T = TypeVar("T")

#: Items handed to one call: about a millisecond of simple work on each.
SLICE = 2000


def in_slices(
    clock: IReactorTime,
    items: Sequence[T],
    step: Callable[[Sequence[T]], object],
    size: int = SLICE,
) -> defer.Deferred[None] | None:
    """
    Call ``step`` on consecutive slices of ``items``, the first now and each next one
    at the reactor's next turn.

    :param clock: the clock whose ``callLater(0, ...)`` makes a turn
    :param items: what to go through (a snapshot: changes to its source meanwhile are
        the caller's to tolerate)
    :param step: called with each slice, in order
    :param size: items per slice
    :return: None when it is all done already (at most one slice), else a Deferred that
        fires when the last slice is done, or fails with what ``step`` raised (no slice
        is called after that)
    """
    step(items[:size])
    if len(items) <= size:
        return None
    done: defer.Deferred[None] = defer.Deferred()

    def next_slice(start: int) -> None:
        try:
            step(items[start : start + size])
        except Exception:
            done.errback()
            return
        if start + size < len(items):
            clock.callLater(0, next_slice, start + size)
        else:
            done.callback(None)

    clock.callLater(0, next_slice, size)
    return done
