"""
The reactor's lag, as production event loops measure it (Node's event-loop delay): a
timer due every 20 ms, and how late each tick runs is how long every other event (a
heartbeat, an accept, a proxied reply) waited too.  The lag goes into the
``hero_reactor_lag_seconds`` histogram, and a pause past 0.2 s is logged, at most one
line per 10 s, so that an operator sees a stall (a full collection of the cycle
collector, a slow write to the state file) where it happened.

A tick costs a few microseconds; at 50 a second that is well under 0.1 % of a core.

:class:`FrozenHeap` keeps the cycle collector's full collections from being such
pauses in a process holding a large, long-lived heap (an explorer with a big fleet).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .metrics import Histogram, histogram_family

log = Logger()

#: Buckets of the lag, in seconds.  A fixed interface: benchmarks and alerts read
#: ``le="0.05"`` (the steady-state budget) and ``le="0.2"`` (the worst pause allowed).
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

#: Seconds between two ticks.
INTERVAL = 0.02

#: A lag past this many seconds is a pause worth a log line.
PAUSE = 0.2

#: At most one log line about pauses per this many seconds; the rest are summed up.
LOG_EVERY = 10.0


class ReactorLag(service.Service):
    """
    Measures how late a timer due every ``interval`` seconds runs, and logs pauses.

    Each tick schedules the next one ``interval`` from now and remembers when it is
    due, so the lag is one subtraction of two clock readings.  (A ``LoopingCall`` keeps
    to a grid instead, and tells how late a call is only in whole skipped intervals,
    which float rounding of the grid points miscounts.)

    It is also a Prometheus collector (:meth:`collect`) of ``hero_reactor_lag_seconds``
    and ``hero_reactor_lag_last_seconds``.

    :param clock: the ``IReactorTime`` of the reactor to watch
    :param interval: seconds between two ticks
    :param pause: a lag past this many seconds is logged
    :param log_every: seconds between two log lines at most
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float = INTERVAL,
        pause: float = PAUSE,
        log_every: float = LOG_EVERY,
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._pause = pause
        self._log_every = log_every
        self._call: IDelayedCall | None = None
        self._due = 0.0
        # Pauses not yet logged: how many, their total and the longest, since when.
        self._held = 0
        self._held_total = 0.0
        self._held_longest = 0.0
        self._held_since = 0.0
        self._quiet_until = 0.0
        #: The last lag measured, in seconds.
        self.last = 0.0
        #: Every lag measured, in seconds.
        self.histogram = Histogram(LAG_BUCKETS)

    def startService(self) -> None:
        service.Service.startService(self)
        # The first measurement starts once the reactor runs: the rest of start-up
        # (loading the fleet, binding listeners) is not a pause of a running reactor.
        self._call = self._clock.callLater(0, self._schedule)

    def stopService(self) -> Deferred[None] | None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._held:
            self._report(self._clock.seconds())
        service.Service.stopService(self)
        return None

    def _schedule(self) -> None:
        self._due = self._clock.seconds() + self._interval
        self._call = self._clock.callLater(self._interval, self._tick)

    def _tick(self) -> None:
        now = self._clock.seconds()
        lag = max(0.0, now - self._due)
        self._schedule()
        self.last = lag
        self.histogram.observe(lag)
        if lag > self._pause:
            if not self._held:
                self._held_since = now - lag
            self._held += 1
            self._held_total += lag
            self._held_longest = max(self._held_longest, lag)
        if self._held and now >= self._quiet_until:
            self._report(now)

    def _report(self, now: float) -> None:
        if self._held == 1:
            log.warn(
                "reactor paused {seconds:.2f} s: every timer, connection and request "
                "waited that long",
                seconds=self._held_total,
            )
        else:
            log.warn(
                "reactor paused {count} times in the last {period:.0f} s, {total:.2f} s "
                "in all, the longest {longest:.2f} s (pauses are logged once per "
                "{every:g} s at most)",
                count=self._held,
                period=now - self._held_since,
                total=self._held_total,
                longest=self._held_longest,
                every=self._log_every,
            )
        self._held = 0
        self._held_total = self._held_longest = 0.0
        self._quiet_until = now + self._log_every

    def collect(self) -> Iterator[Metric]:
        """The metric families, read now."""
        yield GaugeMetricFamily(
            "hero_reactor_lag_last_seconds",
            "How late the reactor ran the last tick of its 20 ms timer",
            value=self.last,
        )
        yield histogram_family(
            "hero_reactor_lag_seconds",
            "How late the reactor runs a timer due every 20 ms: what every event waited",
            [],
            [((), self.histogram)],
        )


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
