"""
The explorer's durable state in one SQLite file (the default backend of
:class:`~hero_compute.explorer.store.IStore`): the last known record of every node,
node identities (secret bindings, enrollment, current certificate), join tokens and
dashboard login tokens (as hashes only: :mod:`.ui_tokens`) and revocations.  Its
tables are in :mod:`.schema`.

The API is synchronous: the file is local and the writes are small and rare.  Nothing
here is meant to run per heartbeat; the caller writes a node record only when something
durable changed (see :func:`needs_save`) and flushes ``last_seen`` in batches with
:meth:`Store.touch_nodes`.

Every multi-statement change runs in one ``BEGIN IMMEDIATE`` transaction, so two
connections to the same file (a restart overlapping a dying explorer, or a test) can
never both redeem one token or interleave half-made changes.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
from zope.interface import implementer

from .interface import IStore
from .rows import audit_entries, copy_order, node_records, node_rows
from .schema import (
    AUDIT_FIELDS,
    DURABLE_FIELDS,
    MIGRATIONS,
    NODE_FIELDS,
    SCHEMA,
    SCHEMA_VERSION,
    Identity,
    StoreError,
    TokenRefused,
    create_private,
    needs_save,
)
from .sqlite_trust import SqliteTrust
from .ui_tokens import SqliteUiTokens

__all__ = [
    "DURABLE_FIELDS",
    "NODE_FIELDS",
    "SCHEMA_VERSION",
    "Identity",
    "Store",
    "StoreError",
    "TokenRefused",
    "needs_save",
]


@implementer(IStore)
@attrs.define
class Store(SqliteTrust, SqliteUiTokens):
    """
    The explorer's SQLite state.  Open with :meth:`open`; :meth:`close` when done.

    SQLite's WAL and shared-memory files take the database file's mode, so they are
    0600 too.

    :ivar path: the database file
    """

    _db: sqlite3.Connection
    path: str
    #: What ``explorer.info`` reports; the file is this explorer's own.
    kind = "sqlite"
    shared = False
    # Heartbeats check identities and serials on every call: answered from memory,
    # and the store's own writes keep these in step (one explorer owns its file).
    _identities: dict = attrs.field(factory=dict, init=False, repr=False)
    _revoked_serials: set = attrs.field(factory=set, init=False, repr=False)
    _revoked_ids: dict = attrs.field(factory=dict, init=False, repr=False)
    # Serial -> when we signed it (or None): asked per heartbeat of a node enrolled again
    # after a revocation.
    _issued_at: dict = attrs.field(factory=dict, init=False, repr=False)
    # Dashboard user -> the hashes of its revoked login tokens (its sessions' check).
    _ui_revoked: dict = attrs.field(factory=dict, init=False, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], timeout: float = 5.0) -> Store:
        """
        Open (creating when missing) the state file and bring its schema up to date.

        :param path: the database file, e.g. ``EXPLORER_STATE_DIR/explorer.db``
        :param timeout: seconds to wait for another connection's write lock
        :raises StoreError: the file is not a database of ours, is damaged, or was
            written by a newer version
        :return: a :class:`Store`
        """
        path = os.fspath(path)
        create_private(path)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so no statement opens a
        # transaction behind our back.
        db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        try:
            store = cls(db, path)
            store._prepare()
        except sqlite3.OperationalError as e:  # locked, unreadable, disk full: not damage
            db.close()
            raise StoreError(f"{path}: cannot use the explorer state ({e})") from e
        except sqlite3.DatabaseError as e:
            db.close()
            raise StoreError(
                f"{path}: not an SQLite database, or damaged ({e}); "
                f"move it aside to start with empty explorer state"
            ) from e
        except BaseException:
            db.close()
            raise
        return store

    def _prepare(self):
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: written by a newer hero_compute (schema {version}; this "
                f"version knows up to {SCHEMA_VERSION}); upgrade, or move the file aside"
            )
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode loses at most the last commits on power loss, never
        # consistency; FULL would fsync every token and enrollment for little gain.
        self._db.execute("PRAGMA synchronous=NORMAL")
        if version < SCHEMA_VERSION:
            with self._transaction():
                # Another process may have created the schema while we waited for the lock.
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    self._create_schema()
                else:
                    self._migrate(version)
        self._revoked_serials.update(
            int(serial, 16)
            for (serial,) in self._db.execute("SELECT serial FROM revoked_serials")
        )
        self._revoked_ids.update(
            self._db.execute("SELECT node_id, revoked_at FROM revoked_ids")
        )
        self._load_ui()

    def _migrate(self, version) -> None:
        while version < SCHEMA_VERSION:
            for statement in MIGRATIONS[version]:
                self._db.execute(statement)
            version += 1
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _create_schema(self):
        tables = self._db.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
        ).fetchone()[0]
        if tables:
            raise StoreError(
                f"{self.path}: an SQLite database, but not hero_compute "
                f"explorer state; refusing to write into it"
            )
        for statement in SCHEMA:
            self._db.execute(statement)
        for version in sorted(MIGRATIONS):
            for statement in MIGRATIONS[version]:
                self._db.execute(statement)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _transaction(self):
        # IMMEDIATE takes the write lock up front: a read-then-write (redeeming a
        # token) cannot be overtaken by another connection between the two.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    @property
    def location(self) -> str:
        """The file, as the log names it."""
        return self.path

    def state(self) -> str:
        """:return: ``up``: a local file does not go away"""
        return "up"

    def close(self) -> None:
        """Close the database; calling it again does nothing."""
        self._db.close()

    # -- nodes -------------------------------------------------------------------------

    def load_nodes(self) -> list[dict[str, Any]]:
        """
        :return: every stored node record, a list of dicts with :data:`NODE_FIELDS`,
            ordered by node id; an undecodable row is logged and skipped, so one bad
            record cannot hide the fleet
        """
        return node_records(
            self._db.execute(f"SELECT {', '.join(NODE_FIELDS)} FROM nodes ORDER BY node_id")
        )

    def save_node(self, record: Mapping[str, Any]) -> None:
        """
        Store a node's record, replacing any earlier one.  Call it when
        :func:`needs_save` says so, not per heartbeat.

        :param record: a mapping with at least :data:`NODE_FIELDS` (others, such as
            ``left`` or ``status``, are ignored), e.g. ``attrs.asdict(node_record)``
        """
        self.save_nodes([record])

    def save_nodes(self, records: Iterable[Mapping[str, Any]]) -> None:
        """
        Store many records in one transaction: a fleet registering at once costs a
        commit per batch, not one per node (a tenth of the CPU, measured).

        :param records: mappings as for :meth:`save_node`
        """
        rows = node_rows(records)
        with self._transaction():
            self._db.executemany(
                f"INSERT OR REPLACE INTO nodes ({', '.join(NODE_FIELDS)}) "
                f"VALUES ({', '.join('?' * len(NODE_FIELDS))})",
                rows,
            )

    def touch_nodes(self, last_seen: Mapping[str, float]) -> None:
        """
        Record newer ``last_seen`` times in one transaction (e.g. every few minutes and
        at shutdown), so ``NODE_FORGET_AFTER`` counts from the truth after a restart.

        :param last_seen: a mapping of node id to last heartbeat time; unknown ids and
            older times are ignored
        """
        with self._transaction():
            self._db.executemany(
                "UPDATE nodes SET last_seen = ?1 WHERE node_id = ?2 AND last_seen < ?1",
                [(seen, node_id) for node_id, seen in last_seen.items()],
            )

    def forget_node(self, node_id: str) -> bool:
        """:return: whether there was a record to drop (the identity stays; see
        :meth:`forget_identity`)"""
        return (
            self._db.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,)).rowcount > 0
        )

    # -- audit -------------------------------------------------------------------------

    def add_audit(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """
        Append audit entries in one transaction.

        :param entries: mappings with :data:`AUDIT_FIELDS`
        """
        with self._transaction():
            self._db.executemany(
                f"INSERT INTO audit ({', '.join(AUDIT_FIELDS)}) VALUES (?, ?, ?, ?, ?, ?)",
                [[e[f] for f in AUDIT_FIELDS] for e in entries],
            )

    def audit(
        self, since: float | None = None, limit: int = 100, node_id: str | None = None
    ) -> list[dict[str, Any]]:
        """
        :param since: only entries at or after this Unix time
        :param node_id: only entries whose target is this node (or one of its VMs)
        :return: entries (dicts with :data:`AUDIT_FIELDS`), newest first
        """
        rows = self._db.execute(
            f"SELECT {', '.join(AUDIT_FIELDS)} FROM audit WHERE time >= ?1 "
            "AND (?2 IS NULL OR target = ?2 "
            "OR substr(target, 1, length(?2) + 1) = ?2 || '/') "
            "ORDER BY id DESC LIMIT ?3",
            (since or 0, node_id, limit),
        )
        return audit_entries(rows)

    # -- state copy --------------------------------------------------------------------

    def rows(self, table: str, columns: Sequence[str]) -> list[list[Any]]:
        """:return: every row of a table of :data:`COPY_TABLES`, as lists"""
        return [
            list(r)
            for r in self._db.execute(
                f"SELECT {', '.join(columns)} FROM {table}{copy_order(table)}"
            )
        ]

    def insert_rows(
        self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> None:
        """Add rows to a table of :data:`COPY_TABLES`, in one transaction."""
        with self._transaction():
            self._db.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' * len(columns))})",
                rows,
            )
