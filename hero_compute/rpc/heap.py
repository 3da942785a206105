"""
The cycle collector tuned for a process holding a large, long-lived heap (an explorer
with a big fleet): :class:`FrozenHeap`.  It is process-wide (the collector's thresholds
and its frozen generation belong to the interpreter), so a process has at most one,
started last; its effect shows in :mod:`~hero_compute.rpc.lag`'s pauses.
"""

from __future__ import annotations

import gc
import time

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()


#: The collector's third threshold under :class:`FrozenHeap`: middle-generation
#: collections between two full ones (Python's default is 10).
FULL_EVERY = 2


class FrozenHeap(service.Service):
    """
    Keeps full collections of the cycle collector short in a process whose heap is
    large and long-lived: an explorer with 50,000 nodes holds ~1M objects (records,
    20,000 connections), and a full collection walks every one of them: 0.1 to 0.5 s
    during which the reactor is stopped, several times while a fleet registers.

    On start (to be the last service started: the fleet loaded, the listeners bound),
    one full collection, then :func:`gc.freeze`: what survived is moved out of the
    collector's sight.  After every full collection since, what survived it is frozen
    too, so that each one walks only the objects made since the last (bounded by the
    collector's thresholds: tens of thousands, milliseconds), not the whole heap.
    The third threshold is lowered from 10 to :data:`FULL_EVERY`: a full collection
    after every 3rd collection of the middle generation instead of every 11th, each
    walking a third as many objects for the same total (measured: the longest full
    collection of a simulated registration 4-10 ms instead of 22-38 ms).

    What this gives up: a frozen object is never examined by the cycle collector
    again.  Reference counting still frees it the moment it is unused, which is how
    the explorer's long-lived objects die (a node record is replaced by the next
    heartbeat's; a closed incoming connection, its protocol and parser are freed at
    once, which a test checks); only garbage *cycles* among frozen objects stay: those
    of an outgoing connection (Twisted's connector and client hold each other), a few
    kilobytes per proxied connection that was frozen while open and closed since.  So
    every ``thaw_every`` seconds the heap is thawed and walked once, a pause as long as
    a full collection without this (logged, with what it found), and frozen again.

    :param clock: ``IReactorTime`` of the thaws
    :param thaw_every: seconds between two thaws, or None for never
    :ivar frozen: objects frozen at start (``gc.get_freeze_count()`` then)
    """

    def __init__(self, clock: IReactorTime, thaw_every: float | None = 3600.0) -> None:
        self._clock = clock
        self._thaw_every = thaw_every
        self._thaw: IDelayedCall | None = None
        self._thresholds = gc.get_threshold()
        self.frozen = 0

    def startService(self) -> None:
        service.Service.startService(self)
        _, self.frozen, ms = self._collect()
        self._thresholds = gc.get_threshold()
        gc.set_threshold(self._thresholds[0], self._thresholds[1], FULL_EVERY)
        gc.callbacks.append(self._collected)
        log.info(
            "froze the {count} objects left by start-up ({ms:.0f} ms): the cycle "
            "collector walks only newer ones from now on",
            count=self.frozen,
            ms=ms,
        )
        self._schedule()

    def stopService(self) -> Deferred[None] | None:
        if self._thaw is not None and self._thaw.active():
            self._thaw.cancel()
        self._thaw = None
        if self._collected in gc.callbacks:
            gc.callbacks.remove(self._collected)
        gc.set_threshold(*self._thresholds)
        gc.unfreeze()
        service.Service.stopService(self)
        return None

    def _collect(self) -> tuple[int, int, float]:
        """:return: objects found unreachable, objects frozen, milliseconds taken"""
        started = time.perf_counter()
        found = gc.collect()
        gc.freeze()
        return found, gc.get_freeze_count(), (time.perf_counter() - started) * 1000

    def _schedule(self) -> None:
        if self._thaw_every is not None:
            self._thaw = self._clock.callLater(self._thaw_every, self.thaw)

    def thaw(self) -> None:
        """Walk the whole heap once: collect the garbage cycles frozen objects made."""
        gc.unfreeze()
        found, count, ms = self._collect()
        log.info(
            "walked the whole heap in {ms:.0f} ms: {found} objects were unreachable, "
            "{count} are frozen again",
            ms=ms,
            found=found,
            count=count,
        )
        self._schedule()

    def _collected(self, phase: str, info: dict[str, int]) -> None:
        # Called at the end of every collection; after a full one the young
        # generations are empty and the old one holds only what survived it.
        if phase == "stop" and info["generation"] == 2:
            gc.freeze()
