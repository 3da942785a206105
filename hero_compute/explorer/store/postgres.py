"""
The explorer's state in PostgreSQL, shared by every explorer of one database
(CONTRACT §10), through psycopg 3.

The methods are synchronous and blocking, like the SQLite store's: the explorer calls
the ones that write from one worker thread (never the reactor).  What heartbeats need
on every call, an id's :class:`Identity` and the revoked serials, is a mirror in memory:
loaded at start, kept in step by our own writes, and by :mod:`.watch` for the other
explorers' (``LISTEN``/``NOTIFY``, with a bounded poll of the ``changes`` table as the
fallback), so a heartbeat never waits on the database.

Every write of an identity, token or revocation takes one advisory transaction lock
first: writes from all explorers are serialised, a token is redeemed once in the whole
fleet, and ``changes`` rows commit in ``seq`` order (the poll never skips one).

A running explorer's statements are bounded (:mod:`.pg_connect`: a statement timeout,
and TCP keepalives for a server gone silent): a write that hangs comes back to the
store's thread as the database being away, so that a stopping explorer is not held by
it for ever.  Migrations (waiting for another explorer's under
the lock, or rewriting a large table) and ``state copy`` (whole tables) run unbounded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from twisted.logger import Logger
from zope.interface import implementer

from hero_compute.rpc.errors import StoreUnavailable

from .interface import IStore
from .migrations import LATEST, POSTGRES
from .pg_connect import STATEMENT_TIMEOUT, connect, reason, redact
from .postgres_trust import PostgresTrust
from .rows import (
    SELECT_IDENTITY,
    audit_entries,
    copy_order,
    identity,
    node_records,
    node_rows,
)
from .schema import AUDIT_FIELDS, NODE_FIELDS, StoreError
from .ui_tokens import PostgresUiTokens
from .watch import CHANNEL, Watcher

log = Logger()

#: ``pg_advisory_lock`` keys: one for migrations, one for every identity write.
MIGRATE_LOCK = 0x6865726F00
WRITE_LOCK = 0x6865726F01


@implementer(IStore)
class PostgresStore(PostgresTrust, PostgresUiTokens):
    """
    The explorer's state in a PostgreSQL database.  Open with :meth:`open`.

    :ivar location: the database, safe to log
    """

    kind = "postgresql"
    shared = True

    def __init__(self, dsn: str, conn: Any, timeout: int = STATEMENT_TIMEOUT) -> None:
        self._dsn = dsn
        self._timeout = timeout
        self.location = redact(dsn)
        self._conn = conn
        self._generation = 0
        self._lock = threading.Lock()
        # The mirror: replaced or extended whole under _mirror, read without it (a dict
        # lookup and a set membership are atomic in CPython).
        self._mirror = threading.Lock()
        self._identities = {}
        self._revoked_serials = set()
        self._revoked_ids = {}
        # Serial -> when it was signed, for the ids ever revoked (the only ones whose
        # heartbeats ask): complete for them, so a miss means "not signed here".
        self._issued_at = {}
        # Dashboard user -> the hashes of its revoked login tokens (.ui_tokens).
        self._ui_revoked = {}
        self._watcher: Watcher | None = None

    @classmethod
    def open(cls, dsn: str, watch: bool = True) -> PostgresStore:
        """
        Connect, migrate the schema under a lock, load the mirror and start watching.

        :param dsn: a ``postgresql://`` URI (libpq form; the password from it,
            ``PGPASSWORD`` or ``PGPASSFILE``)
        :param watch: follow the other explorers' changes, statements bounded by
            :data:`STATEMENT_TIMEOUT` (both off for ``state copy``)
        :raises StoreError: unreachable, or a newer schema (never naming a password)
        """
        try:
            conninfo_to_dict(dsn)
        except psycopg.Error:
            # libpq's parse errors quote the offending part, the password included.
            raise StoreError(
                f"{redact(dsn)}: not a libpq connection URI (check its quoting and "
                "percent-encoding)"
            ) from None
        timeout = STATEMENT_TIMEOUT if watch else 0
        try:
            conn = connect(dsn, timeout)
        except psycopg.Error as e:
            raise StoreError(f"{redact(dsn)}: cannot connect ({reason(e)})") from None
        store = cls(dsn, conn, timeout)
        try:
            store._migrate()
            with store._mirror:
                store._reload(conn)
        except BaseException:
            conn.close()
            raise
        if watch:
            store._watcher = Watcher(dsn, store, connect)
            store._watcher.start()
        return store

    def _migrate(self):
        conn = self._conn
        # Another explorer's migration is waited for, and a step may rewrite a table.
        conn.execute("SET statement_timeout = 0")
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS hero_schema (version integer)")
            row = conn.execute("SELECT max(version) FROM hero_schema").fetchone()
            version = row[0] or 0
            if version > LATEST:
                raise StoreError(
                    f"{self.location}: written by a newer hero_compute (schema "
                    f"{version}; this version knows up to {LATEST}); upgrade this explorer"
                )
            for step in range(version + 1, LATEST + 1):
                with conn.transaction():
                    for statement in POSTGRES[step]:
                        conn.execute(statement)
                    conn.execute("INSERT INTO hero_schema VALUES (%s)", (step,))
                log.info("{db}: schema migrated to {step}", db=self.location, step=step)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))
            conn.execute("RESET statement_timeout")

    def _reload(self, conn):
        """Read the whole mirror again (at start, and after the database was away)."""
        seq = conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
        self._identities = {row[0]: identity(row) for row in conn.execute(SELECT_IDENTITY)}
        self._revoked_serials = {
            int(s, 16) for (s,) in conn.execute("SELECT serial FROM revoked_serials")
        }
        self._revoked_ids = dict(
            conn.execute("SELECT node_id, revoked_at FROM revoked_ids")
        )
        self._issued_at = {
            int(s, 16): at
            for s, at in conn.execute(
                "SELECT serial, issued_at FROM issued_serials WHERE node_id IN "
                "(SELECT node_id FROM revoked_ids)"
            )
        }
        self._load_ui(conn)
        return seq

    def refresh(self, conn: psycopg.Connection[Any], node_ids: Iterable[str]) -> None:
        """Re-read some ids into the mirror (the watcher, for others' changes)."""
        ids = list(node_ids)
        rows = conn.execute(SELECT_IDENTITY + " WHERE node_id = ANY(%s)", (ids,)).fetchall()
        serials = conn.execute(
            "SELECT serial FROM revoked_serials WHERE node_id = ANY(%s)", (ids,)
        ).fetchall()
        revoked = dict(
            conn.execute(
                "SELECT node_id, revoked_at FROM revoked_ids WHERE node_id = ANY(%s)",
                (ids,),
            )
        )
        issued = conn.execute(
            "SELECT serial, issued_at FROM issued_serials WHERE node_id = ANY(%s)", (ids,)
        ).fetchall()
        found = {row[0]: identity(row) for row in rows}
        for node_id in ids:
            if node_id in found:
                self._identities[node_id] = found[node_id]
            else:
                self._identities.pop(node_id, None)
        self._revoked_serials.update(int(s, 16) for (s,) in serials)
        self._revoked_ids.update(revoked)
        self._issued_at.update((int(s, 16), at) for s, at in issued)

    def state(self) -> str:
        """:return: ``up`` or ``down``, as the watcher last saw the server"""
        if self._watcher is None:
            return "up" if self._conn is not None else "down"
        return self._watcher.state

    def close(self) -> None:
        """Stop watching and close the connection; calling it again does nothing."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- the one door to the server ----------------------------------------------------

    @contextlib.contextmanager
    def _use(self, write: bool = False):
        """
        The connection, in a transaction; serialised with the other writers when
        ``write``.  A lost server becomes :class:`StoreUnavailable` (-32007).
        """
        watcher = self._watcher
        if watcher is not None and watcher.state == "down":
            raise StoreUnavailable()
        with self._lock:
            try:
                generation = 0 if watcher is None else watcher.generation
                if self._conn is not None and self._generation != generation:
                    self._conn.close()
                    self._conn = None
                if self._conn is None or self._conn.closed:
                    self._conn = connect(self._dsn, self._timeout)
                    self._generation = generation
                conn = self._conn
                with conn.transaction():
                    if write:
                        conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                    yield conn
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                if self._watcher is not None:
                    self._watcher.lost(e)
                raise StoreUnavailable() from None

    def _changed(self, conn, node_id, kind: str = "node") -> None:
        """
        Tell the other explorers (inside the writing transaction) and ourselves.

        :param node_id: the node id whose identity changed, or (``kind`` ``ui``) the
            dashboard user whose login tokens were revoked
        """
        conn.execute(
            "INSERT INTO changes (node_id, at, kind) "
            "VALUES (%s, extract(epoch FROM now()), %s)",
            (node_id, kind),
        )
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, node_id))

    def _mine(self, conn, node_id) -> None:
        # Our own write, seen at once (the others see it within the watcher's poll).
        with self._mirror:
            self.refresh(conn, [node_id])

    # -- nodes -------------------------------------------------------------------------

    def load_nodes(self) -> list[dict[str, Any]]:
        """:return: every stored node record, as :meth:`Store.load_nodes`"""
        with self._use() as conn:
            rows = conn.execute(
                f"SELECT {', '.join(NODE_FIELDS)} FROM nodes ORDER BY node_id"
            ).fetchall()
        return node_records(rows)

    def save_node(self, record: Mapping[str, Any]) -> None:
        """Store one node record."""
        self.save_nodes([record])

    def save_nodes(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Store many node records in one transaction."""
        rows = node_rows(records)
        updates = ", ".join(f"{f} = excluded.{f}" for f in NODE_FIELDS[1:])
        with self._use() as conn, conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO nodes ({', '.join(NODE_FIELDS)}) "
                f"VALUES ({', '.join(['%s'] * len(NODE_FIELDS))}) "
                f"ON CONFLICT (node_id) DO UPDATE SET {updates}",
                rows,
            )

    def touch_nodes(self, last_seen: Mapping[str, float]) -> None:
        """Move stored ``last_seen`` times forward."""
        if not last_seen:
            return
        with self._use() as conn, conn.cursor() as cur:
            cur.executemany(
                "UPDATE nodes SET last_seen = %s WHERE node_id = %s AND last_seen < %s",
                [(seen, node_id, seen) for node_id, seen in last_seen.items()],
            )

    def forget_node(self, node_id: str) -> bool:
        """:return: whether there was a record to drop"""
        with self._use() as conn:
            cur = conn.execute("DELETE FROM nodes WHERE node_id = %s", (node_id,))
            return cur.rowcount > 0

    # -- audit -------------------------------------------------------------------------

    def add_audit(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Append audit entries in one transaction."""
        with self._use() as conn, conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO audit ({', '.join(AUDIT_FIELDS)}) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                [[e[f] for f in AUDIT_FIELDS] for e in entries],
            )

    def audit(
        self, since: float | None = None, limit: int = 100, node_id: str | None = None
    ) -> list[dict[str, Any]]:
        """:return: audit entries, newest first (as :meth:`Store.audit`)"""
        with self._use() as conn:
            rows = conn.execute(
                f"SELECT {', '.join(AUDIT_FIELDS)} FROM audit WHERE time >= %(since)s "
                "AND (%(node)s::text IS NULL OR target = %(node)s "
                "OR starts_with(target, %(node)s || '/')) ORDER BY id DESC LIMIT %(limit)s",
                {"since": since or 0, "node": node_id, "limit": limit},
            ).fetchall()
        return audit_entries(rows)

    # -- state copy --------------------------------------------------------------------

    def rows(self, table: str, columns: Sequence[str]) -> list[list[Any]]:
        """:return: every row of a table of :data:`COPY_TABLES`, as lists"""
        with self._use() as conn:
            return [
                list(r)
                for r in conn.execute(
                    f"SELECT {', '.join(columns)} FROM {table}{copy_order(table)}"
                )
            ]

    def insert_rows(
        self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> None:
        """Add rows to a table of :data:`COPY_TABLES`, in one transaction."""
        with self._use(write=True) as conn, conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) "
                f"VALUES ({', '.join(['%s'] * len(columns))})",
                rows,
            )
