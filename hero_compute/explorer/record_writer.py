"""
Node records on their way to the state store: kept in memory as heartbeats change
them, written together once a second in bounded transactions, on the store's thread
when the store is shared.  :class:`~hero_compute.explorer.state.ExplorerState` holds
one, and has it write what is left when it stops (:meth:`NodeRecordWriter.finish`).

A failed write loses nothing: its records are kept (the live ones: a change made
meanwhile is what is written next) and retried after a backoff
(:func:`~hero_compute.rpc.backoff.retry_delay`), for as long as the store is away
(:class:`StoreUnavailable`).  Any other error may be one record's own (bad data): the
records of a chunk that failed so are written alone from then on, and one whose
writes fail :data:`MAX_FAILURES` times is logged and dropped (counted in
:attr:`NodeRecordWriter.dropped`; a later change to it is tried afresh), so that it
cannot hold the others back for ever.  A graceful stop waits for the chunks in flight,
then writes every record still kept (a failed chunk's too), waiting while the store is
away, within :data:`STOP_WITHIN` seconds, each write it makes bounded by the time left
(one that hangs on the store's thread is given up, its records counted lost); what is
not written by then is logged once, with its count.  A node dropped meanwhile is not
written back by a chunk that fails.

Long because: the stop's flush shares the running flush's records kept, chunk in flight
and dropped ids; apart, each half would reach into the other's state.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from hero_compute.rpc.backoff import retry_delay
from hero_compute.rpc.errors import StoreUnavailable

from .store.schema import NODE_FIELDS

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from .records import NodeRecord

log = Logger()

#: Seconds new and changed node records wait to be written together; also the first
#: wait after a failed write.
FLUSH_EVERY = 1.0

#: The longest wait between failed writes while the explorer runs: a shared store's
#: own reconnection step (:data:`~.store.watch.BACKOFF_MAX`).
RETRY_MAX = 5.0

#: Node records written per transaction to a local store, one transaction per reactor
#: turn: the write runs on the reactor, and a fleet registering at once (100,000
#: changed records) would otherwise stop it for over half a second.  200 take ~1.2 ms
#: of CPU at 100,000 stored nodes (``bench/periodic_turns.py``; 500 took ~7 ms before
#: shared dicts were encoded once), so a placement or a heartbeat arriving behind a
#: turn waits about that long; smaller chunks cost more in all (a commit each).
FLUSH_CHUNK = 200

#: Node records per transaction to a shared store: its thread writes them, the reactor
#: only takes their snapshot (~0.4 ms for 500), and each transaction costs a round trip
#: to the server.
SHARED_FLUSH_CHUNK = 500

#: Failed writes (its chunk's, then its own; not the store being away) after which a
#: record is dropped.
MAX_FAILURES = 5

#: Seconds a stopping explorer gives the records still to write: three of a shared
#: store's longest reconnection steps, so that a database back within it is seen.
STOP_WITHIN = 15.0

#: Consecutive failed writes after which a stopping explorer gives up, whatever time
#: is left; the waits between them (while the store is away) go from
#: :data:`STOP_RETRY_FIRST` doubling to :data:`STOP_RETRY_MAX`.
STOP_RETRIES = 12
STOP_RETRY_FIRST = 0.2
STOP_RETRY_MAX = 2.0

#: A record's stored fields, in order: its snapshot.
_STORED = operator.attrgetter(*NODE_FIELDS)


class StoreHolder(Protocol):
    """What a record writer uses of :class:`~hero_compute.explorer.state.ExplorerState`."""

    #: The open store (an :class:`~.store.IStore`), or None.
    store: Any

    @property
    def shared(self) -> bool:
        """Whether store calls run on the store's thread (and return Deferreds)."""

    def run_on_store(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``f`` where store calls run: at once, or on the store's thread."""


class NodeRecordWriter:
    """
    The record writer of a state store.

    :param state: the :class:`~hero_compute.explorer.state.ExplorerState`: its
        ``store`` (None when closed), ``shared`` and ``run_on_store``
    :param clock: ``IReactorTime``, to gather a second's records and time the retries
    :ivar dropped: records dropped since start after :data:`MAX_FAILURES` failed writes
    """

    def __init__(self, state: StoreHolder, clock: IReactorTime) -> None:
        self._state = state
        self._clock = clock
        # node id -> the live record to write (the registry's, changed in place).
        self._dirty: dict[str, NodeRecord] = {}
        self._flusher: IDelayedCall | None = None
        # node id -> failed writes of its record (the store away not counted): such a
        # record is written alone until it is written or dropped.
        self._failures: dict[str, int] = {}
        self._failed = 0  # consecutive failed writes: the backoff's count
        # Chunks on the store's thread, their records, the ids dropped meanwhile (a
        # failed chunk must not bring them back), and finish() waiting for them.
        self._in_flight = 0
        self._in_flight_records = 0
        self._forgotten: set[str] = set()
        self._idle: list[defer.Deferred[None]] = []
        self._stopping = False
        self.dropped = 0

    @property
    def store(self) -> Any:
        """The open store, or None."""
        return self._state.store

    @property
    def pending(self) -> int:
        """How many node records wait to be written."""
        return len(self._dirty)

    def save_node(self, record: NodeRecord) -> None:
        """
        Keep a node's record (first sight, or a durable field changed): written with
        the others of the same second in one transaction (:meth:`flush`).  A crash loses
        at most that second of records, which their nodes' next heartbeats restore;
        identities are never deferred.
        """
        self._dirty[record.node_id] = record
        if self._flusher is None and not self._stopping:
            self._flusher = self._clock.callLater(FLUSH_EVERY, self.flush)

    def flush(self) -> None:
        """
        Write up to :data:`FLUSH_CHUNK` (:data:`SHARED_FLUSH_CHUNK` to a shared store)
        of the records kept since the last flush, and the rest a reactor turn later, a
        chunk per turn; never raises.  To a shared store the write runs on the store's
        thread.  Records a write failed for are kept, and tried again after a backoff.
        """
        self._flusher = None
        if not self._dirty or self.store is None or self._stopping:
            return
        shared = self._state.shared
        taken, rows = self._take(SHARED_FLUSH_CHUNK if shared else FLUSH_CHUNK)
        if not shared:
            if self._dirty:
                self._flusher = self._clock.callLater(0, self.flush)
            self._written(self._write(rows), taken)
            return
        self._in_flight += 1
        self._in_flight_records += len(taken)
        d = self._state.run_on_store(self._write, rows)
        d.addCallback(self._returned, taken)

    def _returned(self, error: Exception | None, taken: list[NodeRecord]) -> None:
        self._in_flight -= 1
        self._in_flight_records -= len(taken)
        forgotten = self._forgotten
        if not self._in_flight:
            self._forgotten = set()
        self._written(error, taken, forgotten)
        if not self._in_flight:
            idle, self._idle = self._idle, []
            for waiting in idle:
                waiting.callback(None)

    def _written(
        self,
        error: Exception | None,
        taken: list[NodeRecord],
        forgotten: Collection[str] = (),
    ) -> None:
        """Settle a write, and have the next flush come a turn later or after a backoff."""
        self._settle(error, taken, forgotten)
        if self._stopping or self.store is None or not self._dirty:
            return
        if error is None:
            if self._flusher is None:
                self._flusher = self._clock.callLater(0, self.flush)
            return
        if self._flusher is not None and self._flusher.active():
            # The next chunk's turn, or a save's flush: they wait for the backoff too.
            self._flusher.cancel()
        delay = retry_delay(self._failed, FLUSH_EVERY, RETRY_MAX)
        self._flusher = self._clock.callLater(delay, self.flush)

    def _settle(
        self,
        error: Exception | None,
        taken: list[NodeRecord],
        forgotten: Collection[str] = (),
    ) -> None:
        """Count a write's outcome; keep the records it failed for, or drop them."""
        failures = self._failures
        if error is None:
            self._failed = 0
            if failures:
                for record in taken:
                    failures.pop(record.node_id, None)
            return
        self._failed += 1
        away = isinstance(error, StoreUnavailable)
        why = None if away else Failure(error, type(error), error.__traceback__)
        if why is not None and not (len(taken) == 1 and taken[0].node_id in failures):
            log.failure(
                "could not write {count} node records; each is tried alone now",
                why,
                count=len(taken),
            )
        for record in taken:
            node_id = record.node_id
            if node_id in forgotten:
                continue
            if why is not None:
                count = failures.get(node_id, 0) + 1
                if count >= MAX_FAILURES:
                    del failures[node_id]
                    self.dropped += 1
                    log.failure(
                        "node record {node_id} dropped after {failures} failed writes "
                        "({dropped} dropped since start)",
                        why,
                        node_id=node_id,
                        failures=count,
                        dropped=self.dropped,
                    )
                    continue
                failures[node_id] = count
            # A newer change saved since wins; else the live record, as it is now.
            self._dirty.setdefault(node_id, record)

    def _take(self, size: int) -> tuple[list[NodeRecord], list[dict[str, Any]]]:
        """
        :param size: how many records to take at most
        :return: the records taken, and snapshots of their stored fields (dicts): the
            store's thread writes the snapshot while the registry goes on changing the
            live records in place
        """
        ids = list(itertools.islice(self._dirty, size))
        if self._failures:
            ids = self._alone(ids)
        taken = [self._dirty.pop(i) for i in ids]
        # Not copying the dicts in a record: a heartbeat replaces them, never changes
        # them in place; the store serialises them itself.
        return taken, [dict(zip(NODE_FIELDS, _STORED(r), strict=True)) for r in taken]

    def _alone(self, ids: list[str]) -> list[str]:
        """:return: ``ids`` up to the first that failed before, or that one alone"""
        for n, node_id in enumerate(ids):
            if node_id in self._failures:
                return ids[: n or 1]
        return ids

    def _write(self, rows: list[dict[str, Any]]) -> Exception | None:
        """
        Write a chunk (on the store's thread when shared: this touches nothing else).

        :return: None, or why it failed (returned: the caller settles the records)
        """
        store = self.store
        if store is None:
            return StoreUnavailable()
        try:
            store.save_nodes(rows)
        except Exception as e:
            return e
        return None

    def stop(self) -> None:
        """No more flushes by the clock (the state is closing)."""
        if self._flusher is not None and self._flusher.active():
            self._flusher.cancel()
        self._flusher = None

    def finish(self, within: float = STOP_WITHIN) -> defer.Deferred[int]:
        """
        Write every record still kept, for a graceful stop: no more flushes by the
        clock; wait for the chunks on the store's thread, then write the rest (theirs
        included if they failed) a chunk at a time, where store calls run, retrying
        while the store is away with backoff (at most :data:`STOP_RETRIES` failures in
        a row), all within ``within`` seconds.  What is still not written then is
        logged once, with its count, and forgotten.

        :param within: seconds from now to give up at
        :return: a Deferred firing with how many records were lost (0: none)
        """
        return defer.ensureDeferred(self._finish(within))

    async def _finish(self, within: float) -> int:
        self.stop()
        self._stopping = True
        deadline = self._clock.seconds() + within
        if self._in_flight:
            idle: defer.Deferred[None] = defer.Deferred()
            self._idle.append(idle)
            idle.addTimeout(within, self._clock)
            try:
                await idle
            except defer.TimeoutError:
                return self._lose(
                    self.pending + self._in_flight_records,
                    "a write to the state store did not return in time",
                )
        chunk = SHARED_FLUSH_CHUNK if self._state.shared else FLUSH_CHUNK
        return await self._write_left(chunk, self._state.run_on_store, deadline)

    async def _write_left(
        self, chunk: int, run: Callable[..., Any], deadline: float | None
    ) -> int:
        """
        Write every record kept, a chunk at a time.

        :param run: ``run(f, rows)``: ``f(rows)``, or a Deferred of it
        :param deadline: when to give up (and, while the store is away, wait for
            it until then); None: give up as soon as the store is away
        :return: how many records are lost
        """
        failed, why = 0, ""
        while self._dirty and self.store is not None:
            taken, rows = self._take(chunk)
            if not self._in_flight:
                self._forgotten = set()  # from now: the ids dropped during this write
            written = defer.maybeDeferred(run, self._write, rows)
            if deadline is not None and not written.called:
                # A write that hangs (the store's thread keeps it) must not hold the
                # stop past its deadline: its records are lost with the rest.
                remaining = max(deadline - self._clock.seconds(), 0.0)
                written.addTimeout(remaining, self._clock)
            try:
                error = await written
            except defer.TimeoutError:
                return self._lose(
                    self.pending + len(taken),
                    "a write to the state store did not return in time",
                )
            self._settle(error, taken, self._forgotten)
            now = self._clock.seconds()
            if error is None:
                failed, why = 0, "out of time"
            else:
                failed, why = failed + 1, str(error) or type(error).__name__
            if failed > STOP_RETRIES or (deadline is not None and now >= deadline):
                break
            if error is None or not isinstance(error, StoreUnavailable):
                continue  # its records go alone now, and a bad one is dropped: progress
            if deadline is None:
                break
            wait = retry_delay(failed, STOP_RETRY_FIRST, STOP_RETRY_MAX)
            await task.deferLater(self._clock, min(wait, deadline - now))
        return self._lose(self.pending, why)

    def _lose(self, count: int, why: str) -> int:
        """Give up the records still kept: logged once, with their count."""
        if count:
            msg = "{count} node records lost at shutdown, not written to the store ({why})"
            log.error(msg, count=count, why=why)
        self._dirty.clear()
        self._failures.clear()
        self._forgotten = set()
        self._stopping = False  # the stop is over: a store opened again is written to
        return count

    def write_all(self) -> int:
        """
        Write what is left now, in the caller's thread, waiting for nothing (the state
        is closing without :meth:`finish`, or after it, when this finds nothing); a
        record failing on its own is dropped as in :meth:`flush`.

        :return: how many records were lost (logged once)
        """
        self.stop()
        self._stopping = True
        lost: list[int] = []
        d = defer.ensureDeferred(self._write_left(FLUSH_CHUNK, _call, None))
        d.addCallback(lost.append)
        return lost[0]

    def drop(self, node_id: str) -> None:
        """Write no record of a node any more (it is being forgotten)."""
        self._dirty.pop(node_id, None)
        self._failures.pop(node_id, None)
        # A chunk being written (by a flush, or by the stop) that fails must not bring
        # the record back.
        if self._in_flight or self._stopping:
            self._forgotten.add(node_id)

    def forget_record(self, node_id: str) -> None:
        """Drop a forgotten node's stored record; its identity binding stays."""
        self.drop(node_id)
        if self.store is not None:
            d = defer.maybeDeferred(
                self._state.run_on_store, self.store.forget_node, node_id
            )
            # The next flush or heartbeat settles it; nothing waits on this one.
            d.addErrback(lambda f: f.trap(StoreUnavailable))


def _call(f: Callable[..., Any], *args: Any) -> Any:
    """Run a store call in the caller's thread."""
    return f(*args)
