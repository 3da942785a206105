"""
The explorer's state store as a service: opened first when the explorer starts (the
fleet as last known goes into the registry before any listener binds), closed last
when it stops, once what is buffered (node records, the last heartbeat times) is
written: the node records within :data:`~.record_writer.STOP_WITHIN` seconds, waiting
for the database if it is away for a moment
(:meth:`~.record_writer.NodeRecordWriter.finish`).  Whatever writes to a shared store
runs on the store's one thread.

A stop never waits for that thread on the reactor: it is joined from another thread,
until the stop's deadline.  A call stuck there past it (a hung database: its statement
timeout, :data:`~.store.pg_connect.STATEMENT_TIMEOUT`, brings it back later) is left to
finish on its own: the store is closed once it does, the last heartbeat times are not
kept, and the stop completes at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from hero_compute.rpc.errors import StoreUnavailable

from .record_writer import STOP_WITHIN, NodeRecordWriter
from .records import NodeRecord
from .store import StoreError, is_postgres, open_store

if TYPE_CHECKING:
    import os

    from twisted.internet.interfaces import IReactorFromThreads, IReactorTime

    from .registry import Registry

log = Logger()


class StartupError(Exception):
    """The explorer cannot start as configured; the message says what to change."""


class ExplorerState(service.Service):
    """
    The state store (:mod:`.store`), its thread when shared, and the
    :class:`~.record_writer.NodeRecordWriter` of node records.

    :param clock: ``IReactorTime`` (Unix seconds)
    :param reactor: the reactor (the store's thread hands results back to it)
    :param db_path: ``EXPLORER_DATABASE``: the SQLite state file, or a
        ``postgresql://`` URI shared with other explorers
    :param registry: the :class:`~.registry.Registry` loaded with the stored fleet on
        start, whose last heartbeat times are kept at stop; or None
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        reactor: IReactorFromThreads,
        db_path: str | os.PathLike[str],
        registry: Registry | None = None,
    ) -> None:
        self._clock = clock
        self._reactor = reactor
        self._db_path = db_path
        self._registry = registry
        #: The IStore once started (see store/__init__.py); None before.
        self.store: Any = None
        # A shared store is a server away: whatever writes to it runs on this one
        # thread (in call order, as the reactor would have run them), never the reactor.
        self._pool: ThreadPool | None = None
        #: Node records on their way to the store.
        self.records = NodeRecordWriter(self, clock)

    @property
    def opened(self) -> bool:
        """Whether :meth:`open` has run (and :meth:`close` not since)."""
        return self.store is not None

    @property
    def shared(self) -> bool:
        """Whether store calls run on the store's thread (a shared store)."""
        return self._pool is not None

    def privilegedStartService(self) -> None:
        """Open the store and load the registry with the stored fleet (before binding)."""
        if not self.opened:
            self.open()
            if self._registry is not None:
                self._registry.load(NodeRecord(**n) for n in self.store.load_nodes())
        service.Service.privilegedStartService(self)

    def startService(self) -> None:
        """Start; open the store first if :meth:`privilegedStartService` did not."""
        if not self.opened:
            self.privilegedStartService()
        service.Service.startService(self)

    def stopService(self) -> defer.Deferred[None]:
        """
        Write the node records still kept
        (:meth:`~.record_writer.NodeRecordWriter.finish`: the chunk in flight waited
        for, the database waited for while away, within
        :data:`~.record_writer.STOP_WITHIN` seconds), then :meth:`close`.

        :return: a Deferred firing once the store is closed
        """
        service.Service.stopService(self)
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        deadline = self._clock.seconds() + STOP_WITHIN
        try:
            await self.records.finish(STOP_WITHIN)
        except Exception:
            log.failure("writing the last node records failed")
        if await self._join_store_thread(deadline):
            self.close(self._last_seen())

    async def _join_store_thread(self, deadline: float) -> bool:
        """
        Stop the store's thread, letting what is queued finish, joined off the
        reactor until ``deadline``.

        :return: whether it stopped (or there is none); if not, the store is left
            to close once the call stuck there returns, and forgotten
        """
        pool, self._pool = self._pool, None
        if pool is None:
            return True
        store = self.store
        joined: defer.Deferred[None] = defer.Deferred()
        lock = threading.Lock()
        ends: list[str] = []  # the first of "joined", "stuck"

        def join() -> None:
            pool.stop()
            with lock:
                ends.append("joined")
            if ends[0] == "stuck":
                store.close()
            else:
                self._reactor.callFromThread(joined.callback, None)

        threading.Thread(target=join, name="hero-store-stop", daemon=True).start()
        joined.addTimeout(max(deadline - self._clock.seconds(), 0.0), self._clock)
        try:
            await joined
        except defer.TimeoutError:
            with lock:
                ends.append("stuck")
            if ends[0] == "joined":
                return True  # it stopped just now
            self.records.stop()
            self.store = None
            log.warn(
                "a call to the state store did not return by the stop's deadline: "
                "last heartbeat times not kept"
            )
            return False
        return True

    def _last_seen(self) -> dict[str, float]:
        if self._registry is None:
            return {}
        return {r.node_id: r.last_seen for r in self._registry.records()}

    def open(self) -> None:
        """Open the state store; raises :class:`StartupError` if it cannot be used."""
        variable = (
            "EXPLORER_DATABASE" if is_postgres(self._db_path) else "EXPLORER_STATE_DIR"
        )
        try:
            self.store = open_store(self._db_path)
        except StoreError as e:
            raise StartupError(f"{e} ({variable})") from None
        except OSError as e:
            raise StartupError(
                f"cannot create the explorer state {self._db_path}: "
                f"{e.strerror} (set EXPLORER_STATE_DIR)"
            ) from None
        if self.store.shared:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="hero-store")
            self._pool.start()
        log.info(
            "state store: {kind} {location}",
            kind=self.store.kind,
            location=self.store.location,
        )

    @property
    def store_state(self) -> dict[str, str]:
        """``{"kind", "state"}`` of the state store, for ``explorer.info`` and metrics."""
        if self.store is None:
            kind = "postgresql" if is_postgres(self._db_path) else "sqlite"
            return {"kind": kind, "state": "down"}
        return {"kind": self.store.kind, "state": self.store.state()}

    def run_on_store(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """
        Run a store call: at once for a local file, on the store's thread otherwise.

        :return: what ``f`` returns, or (shared) a Deferred of it
        """
        if self._pool is None:
            return f(*args, **kwargs)
        return deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)

    def load_nodes(self) -> list[dict[str, Any]]:
        """:return: the node records kept from the last run (dicts)"""
        nodes: list[dict[str, Any]] = self.store.load_nodes()
        return nodes

    def close(self, last_seen: Mapping[str, float]) -> None:
        """
        Write the node records still buffered, at once (:meth:`stopService` has
        written them already, waiting as needed), and the last heartbeat times, and
        close the store.

        :param last_seen: node id -> last heartbeat time
        """
        self.records.stop()
        if self._pool is not None:
            # Lets what is queued finish first: nothing acknowledged is dropped.
            self._pool.stop()
            self._pool = None
        if self.store is None:
            return
        self.records.write_all()
        try:
            self.store.touch_nodes(last_seen)
        except StoreUnavailable:
            log.warn("state store down at shutdown: last heartbeat times not kept")
        finally:
            self.store.close()
            self.store = None
