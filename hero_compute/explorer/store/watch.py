"""
Keeping one explorer's mirror of a shared store in step with the others' writes, and
knowing whether the server is there.

A thread of its own, on a connection of its own: it waits on ``LISTEN`` for at most
:data:`POLL` seconds, then reads the ``changes`` rows after the last it applied, so a
lost notification (a dropped connection, a proxy that strips them) costs at most one
poll; both stay well inside the 2 s of CONTRACT §10.  When the server goes away it
reconnects with jittered exponential backoff and, once back, reads the whole mirror
again (it cannot know what it missed).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from twisted.logger import Logger

from hero_compute.rpc.backoff import retry_delay

log = Logger()

#: The ``NOTIFY`` channel every identity change (and dashboard user revocation) is
#: announced on.
CHANNEL = "hero_compute_changes"

#: Longest wait for a notification before polling ``changes`` anyway.
POLL = 0.5

#: Reconnection delays: steps from BACKOFF_MIN doubling up to BACKOFF_MAX, each delay
#: between half and all of its step (:func:`~hero_compute.rpc.backoff.retry_delay`).
BACKOFF_MIN = 0.2
BACKOFF_MAX = 5.0

#: ``changes`` rows older than this many seconds are dropped (every explorer that is
#: up has long read them; one that was away reads the whole mirror anyway).
KEEP_CHANGES = 3600.0


class Watcher:
    """
    The watcher thread of a :class:`~hero_compute.explorer.store.postgres.PostgresStore`.

    :param dsn: the connection string
    :param store: the store whose mirror it keeps (``refresh``, ``_reload``, ``_mirror``)
    :param connect: ``connect(dsn) -> psycopg.Connection``
    :ivar state: ``up`` or ``down``
    """

    def __init__(
        self,
        dsn: str,
        store: Any,
        connect: Callable[[str], psycopg.Connection[Any]],
    ) -> None:
        self._dsn = dsn
        self._store = store
        self._connect = connect
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="hero-store-watch", daemon=True
        )
        self.state = "up"
        #: Counts the server's comebacks: a connection made before the last one is
        #: stale (its server went away) and is replaced before use.
        self.generation = 0
        self._seq = None
        self._lost = False

    def start(self) -> None:
        """Start following."""
        self._thread.start()

    def stop(self) -> None:
        """Stop, and wait (briefly) for the thread."""
        self._stopping.set()
        self._thread.join(timeout=5)

    def lost(self, error: BaseException) -> None:
        """The store's own connection failed: mark the server down until we reconnect."""
        if self.state == "up":
            log.warn(
                "state store {db} is down: {error}",
                db=self._store.location,
                error=_first_line(error),
            )
        self.state = "down"
        self._lost = True

    def _run(self) -> None:
        conn, attempt, swept = None, 0, 0.0
        while not self._stopping.is_set():
            try:
                if conn is None or self._lost:
                    if conn is not None:
                        conn.close()
                    self._lost = False
                    conn = self._connect(self._dsn)
                    conn.execute(f"LISTEN {CHANNEL}")
                    with self._store._mirror:
                        self._seq = self._store._reload(conn)
                    if self.state != "up":
                        self.generation += 1
                        log.info("state store {db} is up again", db=self._store.location)
                    self.state, attempt = "up", 0
                for _ in conn.notifies(timeout=POLL, stop_after=1):
                    pass
                self._catch_up(conn)
                swept = self._sweep(conn, swept)
            except psycopg.Error as e:
                if conn is not None:
                    conn.close()
                conn = None
                self.lost(e)
                self._lost = False
                attempt += 1
                self._stopping.wait(retry_delay(attempt, BACKOFF_MIN, BACKOFF_MAX))
        if conn is not None:
            conn.close()

    def _catch_up(self, conn) -> None:
        rows = conn.execute(
            "SELECT seq, node_id, kind FROM changes WHERE seq > %s ORDER BY seq",
            (self._seq,),
        ).fetchall()
        if not rows:
            return
        nodes = {name for _, name, kind in rows if kind == "node"}
        users = {name for _, name, kind in rows if kind == "ui"}
        with self._store._mirror:
            if nodes:
                self._store.refresh(conn, nodes)
            if users:
                self._store.refresh_ui(conn, users)
        self._seq = rows[-1][0]

    def _sweep(self, conn, swept):
        if swept and time.monotonic() - swept < KEEP_CHANGES / 4:
            return swept
        conn.execute(
            "DELETE FROM changes WHERE at < extract(epoch FROM now()) - %s",
            (KEEP_CHANGES,),
        )
        return time.monotonic()


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
