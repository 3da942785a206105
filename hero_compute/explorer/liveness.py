"""
The liveness sweep: tells operators, once, when a node goes quiet, and forgets nodes
offline for too long.  Liveness itself is derived by the registry from each node's last
heartbeat; the sweep only reports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from hero_compute.rpc.slices import in_slices

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime

    from .records import NodeRecord
    from .registry import Registry


log = Logger()

#: The liveness sweep runs this many times per ``offline_after``, so a node going quiet
#: is reported at most a quarter of ``offline_after`` late ...
SWEEPS_PER_OFFLINE = 4

#: ... but never more often than this (seconds): a tiny ``offline_after`` in a test or
#: a lab must not turn the sweep over a large fleet into a busy loop ...
MIN_SWEEP = 0.5

#: ... nor less often than this (seconds): the sweep also sums up the node events of
#: the last second that were not logged one by one, which should not wait for long.
MAX_SWEEP = 5.0


#: Nodes found offline reported (or forgotten) per reactor turn: one newly offline costs
#: ~2.7 µs (logged, taken out of the fleet summary), many times a look at a record
#: (``SLICE`` per turn), so 500 take ~1.4 ms (``bench/periodic_turns.py``).
REPORT_SLICE = 500


def sweep_interval(offline_after: float) -> float:
    """
    Seconds between two liveness sweeps.

    :param offline_after: seconds of silence after which a node is offline
    """
    return max(MIN_SWEEP, min(MAX_SWEEP, offline_after / SWEEPS_PER_OFFLINE))


class LivenessLog(service.Service):
    """
    Logs, once per transition, each node that has gone offline by silence (within the
    registry's log budget), and forgets nodes offline for longer than ``forget_after``.

    :param registry: the :class:`Registry`
    :param clock: the clock to sweep with
    :param interval: seconds between sweeps
    :param forget_after: seconds offline after which a node is forgotten, or None
    :param forgotten: called with each node id forgotten (to drop its stored record)
    """

    def __init__(
        self,
        registry: Registry,
        clock: IReactorTime,
        interval: float,
        forget_after: float | None = None,
        forgotten: Callable[[str], object] | None = None,
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._interval = interval
        self._forget_after = forget_after
        self._forgotten = forgotten
        self._offline: set[str] = set()
        self._loop: task.LoopingCall | None = None

    def sweep(self) -> Deferred[None] | None:
        """
        Log nodes that went offline since the last sweep, forget the long gone; never
        fails.  A large fleet is gone through a slice per reactor turn, and so are the
        nodes found offline (a whole fleet of them after a restart: ~80 ms in one go).

        :return: None when done, or a Deferred that fires when the last slice is
        """
        now = self._clock.seconds()
        found: list[NodeRecord] = []
        registry = self._registry

        def step(records: Sequence[NodeRecord]) -> None:
            found.extend(registry.offline(now, records))

        try:
            registry.flush_log()
            d = in_slices(self._clock, self._registry.records(), step)
        except Exception:
            # A LoopingCall whose function raises stops for good.
            log.failure("liveness sweep failed")
            return None
        if d is None:
            return self._report(now, found)
        d.addCallback(lambda _: self._report(now, found))
        d.addErrback(lambda f: log.failure("liveness sweep failed", f))
        return d

    def _report(self, now: float, found: list[NodeRecord]) -> Deferred[None] | None:
        """
        Log and forget what a sweep found offline at ``now``, a slice per turn; never
        raises.

        :return: None when done, or a Deferred that fires when the last slice is
        """
        offline: set[str] = set()
        forget: list[NodeRecord] = []
        try:
            d = in_slices(
                self._clock,
                found,
                lambda records: self._look(now, records, offline, forget),
                REPORT_SLICE,
            )
        except Exception:
            log.failure("liveness sweep failed")
            return None
        if d is None:
            return self._forget(now, offline, forget)
        d.addCallback(lambda _: self._forget(now, offline, forget))
        d.addErrback(lambda f: log.failure("liveness sweep failed", f))
        return d

    def _still_offline(self, now: float, record: NodeRecord) -> bool:
        """Whether a record found offline at ``now`` is still the node's, and offline."""
        registry = self._registry
        # Gone, or back, since its slice was looked at.
        return registry.find(record.node_id) is record and bool(
            registry.offline(now, [record])
        )

    def _look(
        self,
        now: float,
        records: Sequence[NodeRecord],
        offline: set[str],
        forget: list[NodeRecord],
    ) -> None:
        """Note each of ``records`` offline, log those newly so, set aside the long gone."""
        registry = self._registry
        summary = getattr(registry, "summary", None)
        if summary is not None:
            # As many of the fleet summary's nodes gone quiet as looked at here: a fleet
            # gone quiet at once (~140 ms at 100,000 nodes) is taken out in slices (a
            # read takes out a few hundred, and counts the others where they are).
            summary.expire(now, len(records))
        for record in records:
            if not self._still_offline(now, record):
                continue
            offline.add(record.node_id)
            if (
                self._forget_after is not None
                and now - record.last_seen > self._forget_after
            ):
                forget.append(record)
            elif record.node_id not in self._offline and not record.left:
                registry.note(
                    "node {node_id} ({name}) is offline: no heartbeat for {silence:.0f} s",
                    node_id=record.node_id,
                    name=record.name,
                    silence=now - record.last_seen,
                )
                if getattr(registry, "on_event", None) is not None:
                    registry.on_event("node.offline", record.node_id, reason="silent")

    def _forget(
        self, now: float, offline: set[str], forget: list[NodeRecord]
    ) -> Deferred[None] | None:
        """
        Forget the long gone, a slice per turn, then keep ``offline`` as the nodes
        already reported.

        :return: None when done, or a Deferred that fires when the last slice is
        """

        def done(_: object = None) -> None:
            # A node back during the report's turns stays in the set until the next
            # sweep rebuilds it: silent for offline_after again by then, it cannot be.
            self._offline = offline

        try:
            d = in_slices(
                self._clock,
                forget,
                lambda records: self._remove(now, records, offline),
                REPORT_SLICE,
            )
        except Exception:
            log.failure("liveness sweep failed")
            return None
        if d is None:
            done()
            return None
        return d.addCallback(done)

    def _remove(self, now: float, records: Sequence[NodeRecord], offline: set[str]) -> None:
        registry = self._registry
        for record in records:
            if not self._still_offline(now, record):
                offline.discard(record.node_id)  # back: reported again when it goes
                continue
            registry.remove(record.node_id)
            offline.discard(record.node_id)
            registry.note(
                "node {node_id} ({name}) forgotten: offline for {days:.1f} days",
                node_id=record.node_id,
                name=record.name,
                days=(now - record.last_seen) / 86400,
            )
            if self._forgotten is not None:
                self._forgotten(record.node_id)
            if getattr(registry, "on_event", None) is not None:
                registry.on_event("node.removed", record.node_id, reason="forgotten")

    def startService(self) -> None:
        """Sweep every ``interval`` seconds, the first one ``interval`` from now."""
        service.Service.startService(self)
        self._loop = task.LoopingCall(self.sweep)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        """Sweep no more (a sweep under way finishes its slices)."""
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
