"""
The reactor's lag, as production event loops measure it (Node's event-loop delay): a
timer due every 20 ms, and how late each tick runs is how long every other event (a
heartbeat, an accept, a proxied reply) waited too.  The lag goes into the
``hero_reactor_lag_seconds`` histogram, and a pause past 0.2 s is logged, at most one
line per 10 s, so that an operator sees a stall (a full collection of the cycle
collector, a slow write to the state file) where it happened.

A tick costs a few microseconds; at 50 a second that is well under 0.1 % of a core.

:class:`~hero_compute.rpc.heap.FrozenHeap` keeps the cycle collector's full collections
from being such pauses in a process holding a large, long-lived heap (an explorer with a
big fleet).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .metrics import Histogram, histogram_family
from .throttle import Throttle

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
        # One line per log_every: a pause, or the sum of those held since the last.
        self._log = Throttle(clock, log_every)
        # Pauses not yet logged: how many, their total and the longest, since when.
        self._held = 0
        self._held_total = 0.0
        self._held_longest = 0.0
        self._held_since = 0.0
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
            self._log.take()
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
            if self._log.offer() is not None:
                self._report(now)
        elif self._held and self._log.flush():
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
