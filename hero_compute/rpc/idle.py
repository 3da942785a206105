"""
The idle sweep of a listener's connections: one timer for all of them, rather than one
per connection re-armed by every read (600 bytes each, and a call per read, at fleet
scale tens of thousands of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .slices import in_slices

log = Logger()

#: Idle connections are swept this many times per ``idle_timeout``: one is closed
#: between ``idle_timeout`` and a quarter more of it after its last byte.
IDLE_SWEEPS = 4


class Idles(Protocol):
    """What the sweep needs of a connection."""

    #: Since when it is idle (no byte received, nothing in flight), or None.
    _idle_since: float | None
    _lost: bool

    def timeoutConnection(self) -> None:
        """Cut it off."""


class IdleSweep:
    """
    The open connections of a factory, and the timer that cuts off those idle for
    longer than ``idle_timeout``; the timer runs only while there are some.

    :param clock: the reactor
    :param idle_timeout: seconds
    """

    def __init__(self, clock: IReactorTime, idle_timeout: float) -> None:
        self._clock = clock
        self._idle_timeout = idle_timeout
        #: The connections of the factory, swept when idle.
        self.connections: set[Idles] = set()
        self._sweeper: task.LoopingCall | None = None

    def add(self, proto: Idles) -> None:
        """A connection is up: it is swept when idle."""
        self.connections.add(proto)
        if self._sweeper is None:
            self._sweeper = task.LoopingCall(self._sweep)
            self._sweeper.clock = self._clock
            self._sweeper.start(self._idle_timeout / IDLE_SWEEPS, now=False)

    def discard(self, proto: Idles) -> None:
        """A connection is gone."""
        self.connections.discard(proto)
        if not self.connections and self._sweeper is not None:
            # Nothing to sweep: no timer left behind either.
            self._sweeper.stop()
            self._sweeper = None

    def _sweep(self) -> defer.Deferred[None] | None:
        # Tens of thousands of connections: a slice per reactor turn.
        try:
            return in_slices(self._clock, list(self.connections), self._sweep_some)
        except Exception:
            # A LoopingCall whose function raises stops for good.
            log.failure("idle sweep failed")
            return None

    def _sweep_some(self, protos: Sequence[Idles]) -> None:
        since = self._clock.seconds() - self._idle_timeout
        for proto in protos:
            idle = proto._idle_since
            if idle is not None and idle <= since and not proto._lost:
                proto.timeoutConnection()
