"""
The explorer's durable state in one SQLite file (the default backend of
:class:`~hero_compute.explorer.store.IStore`): the last known record of every node,
node identities (secret bindings, enrollment, current certificate), join tokens (as
hashes only) and revocations.  Its tables are in :mod:`.schema`.

The API is synchronous: the file is local and the writes are small and rare.  Nothing
here is meant to run per heartbeat; the caller writes a node record only when something
durable changed (see :func:`needs_save`) and flushes ``last_seen`` in batches with
:meth:`Store.touch_nodes`.

Every multi-statement change runs in one ``BEGIN IMMEDIATE`` transaction, so two
connections to the same file (a restart overlapping a dying explorer, or a test) can
never both redeem one token or interleave half-made changes.

Long because: it is the one module that speaks SQL, on purpose: every statement on the
state file, and each transaction's boundaries, are reviewed in one place.
"""

import contextlib
import json
import os
import sqlite3

import attrs
from twisted.logger import Logger

from .schema import (
    AUDIT_FIELDS,
    DURABLE_FIELDS,
    JSON_FIELDS,
    MIGRATIONS,
    NODE_FIELDS,
    SCHEMA,
    SCHEMA_VERSION,
    Identity,
    StoreError,
    TokenRefused,
    check_sha256,
    create_private,
    needs_save,
    serial_text,
)

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

log = Logger()


@attrs.define
class Store:
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

    @classmethod
    def open(cls, path, timeout=5.0):
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

    def _migrate(self, version):
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
    def location(self):
        """The file, as the log names it."""
        return self.path

    def state(self):
        """:return: ``up``: a local file does not go away"""
        return "up"

    def close(self):
        """Close the database; calling it again does nothing."""
        self._db.close()

    # -- nodes -------------------------------------------------------------------------

    def load_nodes(self):
        """
        :return: every stored node record, a list of dicts with :data:`NODE_FIELDS`,
            ordered by node id; an undecodable row is logged and skipped, so one bad
            record cannot hide the fleet
        """
        nodes = []
        for row in self._db.execute(
            f"SELECT {', '.join(NODE_FIELDS)} FROM nodes ORDER BY node_id"
        ):
            record = dict(zip(NODE_FIELDS, row, strict=True))
            try:
                for field in JSON_FIELDS:
                    record[field] = json.loads(record[field])
            except ValueError:
                log.warn(
                    "skipping stored node {node_id}: undecodable record",
                    node_id=record["node_id"],
                )
                continue
            nodes.append(record)
        return nodes

    def save_node(self, record):
        """
        Store a node's record, replacing any earlier one.  Call it when
        :func:`needs_save` says so, not per heartbeat.

        :param record: a mapping with at least :data:`NODE_FIELDS` (others, such as
            ``left`` or ``status``, are ignored), e.g. ``attrs.asdict(node_record)``
        """
        self.save_nodes([record])

    def save_nodes(self, records):
        """
        Store many records in one transaction: a fleet registering at once costs a
        commit per batch, not one per node (a tenth of the CPU, measured).

        :param records: mappings as for :meth:`save_node`
        """
        rows = [
            [
                json.dumps(record[f], sort_keys=True, allow_nan=False)
                if f in JSON_FIELDS
                else record[f]
                for f in NODE_FIELDS
            ]
            for record in records
        ]
        with self._transaction():
            self._db.executemany(
                f"INSERT OR REPLACE INTO nodes ({', '.join(NODE_FIELDS)}) "
                f"VALUES ({', '.join('?' * len(NODE_FIELDS))})",
                rows,
            )

    def touch_nodes(self, last_seen):
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

    def forget_node(self, node_id):
        """:return: whether there was a record to drop (the identity stays; see
        :meth:`forget_identity`)"""
        return (
            self._db.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,)).rowcount > 0
        )

    # -- identities --------------------------------------------------------------------

    def _identity_row(self, node_id):
        return self._db.execute(
            "SELECT secret_sha256, enrolled, cert_serial, previous_serial, revoked_at "
            "FROM identities WHERE node_id = ?",
            (node_id,),
        ).fetchone()

    def identity(self, node_id):
        """:return: the node id's :class:`Identity`, or ``None`` when nothing is held"""
        try:
            return self._identities[node_id]
        except KeyError:
            pass
        identity = self._identities[node_id] = self._read_identity(node_id)
        return identity

    def _read_identity(self, node_id):
        row = self._identity_row(node_id)
        if row is None:
            return None
        secret, enrolled, serial, previous, revoked_at = row
        return Identity(
            node_id=node_id,
            secret_sha256=secret,
            enrolled=bool(enrolled),
            cert_serial=None if serial is None else int(serial, 16),
            previous_serial=None if previous is None else int(previous, 16),
            revoked=revoked_at is not None,
        )

    def bind_secret(self, node_id, secret_sha256):
        """
        Bind a node secret to an id on first sight, or check it against the bound one.

        :param secret_sha256: hex SHA-256 of the secret
        :return: ``True`` when the id is (now) bound to this secret; ``False`` when it is
            bound to another, is revoked, or the secret was revoked
        """
        check_sha256(secret_sha256, "secret_sha256")
        self._identities.pop(node_id, None)
        with self._transaction():
            if self._db.execute(
                "SELECT 1 FROM revoked_secrets WHERE secret_sha256 = ?", (secret_sha256,)
            ).fetchone():
                return False
            row = self._identity_row(node_id)
            if row is None:
                self._db.execute(
                    "INSERT INTO identities (node_id, secret_sha256) VALUES (?, ?)",
                    (node_id, secret_sha256),
                )
                return True
            bound, revoked_at = row[0], row[4]
            if revoked_at is not None:
                return False
            if bound is None:
                self._db.execute(
                    "UPDATE identities SET secret_sha256 = ? WHERE node_id = ?",
                    (secret_sha256, node_id),
                )
                return True
            return bound == secret_sha256

    def mark_enrolled(self, node_id, cert_serial, now):
        """
        Bind an id to a newly enrolled certificate.  Any earlier certificates of the id
        (current and previous) are revoked: a node enrolls again when its key is lost or
        suspect.  A revoked state is lifted, for this certificate only.

        :param cert_serial: the new certificate's serial (an ``int``)
        :param now: the time, recorded against the serials it revokes
        """
        new = serial_text(cert_serial)
        self._identities.pop(node_id, None)
        with self._transaction():
            row = self._identity_row(node_id)
            if row is None:
                self._db.execute("INSERT INTO identities (node_id) VALUES (?)", (node_id,))
            else:
                self._revoke_serials(node_id, (row[2], row[3]), now, keep=new)
            self._db.execute(
                "UPDATE identities SET enrolled = 1, cert_serial = ?, "
                "previous_serial = NULL, revoked_at = NULL WHERE node_id = ?",
                (new, node_id),
            )
            self._issued(new, node_id, now)

    def renew_serial(self, node_id, old_serial, new_serial, now):
        """
        Replace an id's current certificate by a renewed one, if ``old_serial`` is still
        current (compare-and-swap: of two renewals from one certificate only the first
        wins).  The renewed certificate stays accepted as ``previous_serial``; the one
        before it is revoked.  An id that never enrolled and is not revoked (its
        certificate was made offline) becomes enrolled with the new certificate.

        :return: whether the swap happened
        """
        old, new = serial_text(old_serial), serial_text(new_serial)
        self._identities.pop(node_id, None)
        with self._transaction():
            row = self._identity_row(node_id)
            if row is None:
                self._db.execute("INSERT INTO identities (node_id) VALUES (?)", (node_id,))
            elif row[4] is not None or (row[1] and row[2] != old):
                return False
            else:
                self._revoke_serials(node_id, (row[3],), now, keep=old)
            self._db.execute(
                "UPDATE identities SET enrolled = 1, cert_serial = ?, "
                "previous_serial = ? WHERE node_id = ?",
                (new, old, node_id),
            )
            self._issued(new, node_id, now)
            return True

    def _issued(self, serial, node_id, now):
        self._db.execute(
            "INSERT OR IGNORE INTO issued_serials VALUES (?, ?, ?)", (serial, node_id, now)
        )
        self._issued_at.pop(int(serial, 16), None)

    def issued_at(self, serial):
        """
        :param serial: a certificate serial (an ``int``)
        :return: when this explorer signed that certificate (enrollment or renewal), or
            ``None`` for one it never signed (made offline, or by another CA holder)
        """
        try:
            return self._issued_at[serial]
        except KeyError:
            pass
        row = self._db.execute(
            "SELECT issued_at FROM issued_serials WHERE serial = ?", (serial_text(serial),)
        ).fetchone()
        issued = self._issued_at[serial] = None if row is None else row[0]
        return issued

    def knows(self, node_id):
        """
        :return: whether anything is held about the id: a node record, an identity
            (secret binding, enrollment, revocation), a revocation of the id or of one
            of its certificates, or a certificate signed for it; removing a node leaves
            the revocations and the signed certificates, so a removed id stays known
        """
        if node_id in self._revoked_ids or self.identity(node_id) is not None:
            return True
        return any(
            self._db.execute(
                f"SELECT 1 FROM {table} WHERE node_id = ? LIMIT 1", (node_id,)
            ).fetchone()
            for table in ("nodes", "revoked_serials", "issued_serials")
        )

    def forget_identity(self, node_id):
        """
        Forget an id's secret binding and enrollment, as when a node is removed.
        Removing never undoes a revocation: a revoked id stays revoked, and revoked
        serials and secrets stay refused.
        """
        self._identities.pop(node_id, None)
        with self._transaction():
            self._db.execute(
                "DELETE FROM identities WHERE node_id = ? AND revoked_at IS NULL",
                (node_id,),
            )

    # -- tokens ------------------------------------------------------------------------

    def add_token(self, token_hash, node_id, expires_at):
        """
        Store a join token by its hash.

        :param token_hash: hex SHA-256 of the token
        :param node_id: the only node id it may enroll, or ``None`` for any new one
        :param expires_at: Unix time after which it is refused
        """
        check_sha256(token_hash, "token_hash")
        self._db.execute(
            "INSERT INTO tokens (token_hash, node_id, expires_at) VALUES (?, ?, ?)",
            (token_hash, node_id, expires_at),
        )

    def peek_token(self, token_hash, now):
        """
        Check a token without using it up.

        :return: the node id it allows, or ``None`` when it names none
        :raises TokenRefused: unknown, used or expired
        """
        row = self._db.execute(
            "SELECT node_id FROM tokens WHERE token_hash = ? AND used = 0 "
            "AND expires_at > ?",
            (check_sha256(token_hash, "token_hash"), now),
        ).fetchone()
        if row is None:
            raise TokenRefused()
        return row[0]

    def redeem_token(self, token_hash, now):
        """
        Use a token up, atomically: of two redeems only one succeeds.  Expired tokens
        are purged on the way.

        :return: the node id it allows, or ``None`` when it names none
        :raises TokenRefused: unknown, used or expired
        """
        check_sha256(token_hash, "token_hash")
        with self._transaction():
            self._purge_tokens(now)
            row = self._db.execute(
                "SELECT node_id FROM tokens WHERE token_hash = ? AND used = 0",
                (token_hash,),
            ).fetchone()
            if row is not None:
                self._db.execute(
                    "UPDATE tokens SET used = 1 WHERE token_hash = ?", (token_hash,)
                )
        # Raised after the commit, so a refusal still keeps the purge.
        if row is None:
            raise TokenRefused()
        return row[0]

    def _purge_tokens(self, now):
        # Used tokens are kept until they expire, so the record shows they were used.
        self._db.execute("DELETE FROM tokens WHERE expires_at <= ?", (now,))

    # -- revocation --------------------------------------------------------------------

    def revoke(self, node_id, now):
        """
        Revoke a node id: its current and previous certificates and its bound secret are
        refused from now on, and the id stays revoked until it enrolls again.

        :param now: the time of revocation
        """
        self._identities.pop(node_id, None)
        with self._transaction():
            row = self._identity_row(node_id)
            if row is None:
                self._db.execute("INSERT INTO identities (node_id) VALUES (?)", (node_id,))
            else:
                self._revoke_serials(node_id, (row[2], row[3]), now)
                if row[0] is not None:
                    self._db.execute(
                        "INSERT OR IGNORE INTO revoked_secrets VALUES (?, ?, ?)",
                        (row[0], node_id, now),
                    )
            self._db.execute(
                "UPDATE identities SET secret_sha256 = NULL, enrolled = 0, "
                "cert_serial = NULL, previous_serial = NULL, "
                "revoked_at = coalesce(revoked_at, ?) WHERE node_id = ?",
                (now, node_id),
            )
            # The latest revocation counts: it covers every certificate issued before.
            self._db.execute(
                "INSERT INTO revoked_ids VALUES (?1, ?2) ON CONFLICT (node_id) "
                "DO UPDATE SET revoked_at = max(revoked_at, ?2)",
                (node_id, now),
            )
        self._revoked_ids[node_id] = max(now, self._revoked_ids.get(node_id, now))

    def revoke_serial(self, serial, node_id, now):
        """Refuse one certificate from now on, e.g. one signed but never handed out."""
        with self._transaction():
            self._revoke_serials(node_id, (serial_text(serial),), now)

    def _revoke_serials(self, node_id, serials, now, keep=None):
        revoked = [s for s in serials if s is not None and s != keep]
        self._db.executemany(
            "INSERT OR IGNORE INTO revoked_serials VALUES (?, ?, ?)",
            [(s, node_id, now) for s in revoked],
        )
        self._revoked_serials.update(int(s, 16) for s in revoked)

    def is_revoked_serial(self, serial):
        """:return: whether the certificate with this serial has been revoked"""
        return serial in self._revoked_serials

    def id_revoked_at(self, node_id):
        """
        :return: the last time the id was revoked (kept through re-enrollment and
            removal), or ``None`` if it never was
        """
        return self._revoked_ids.get(node_id)

    # -- audit -------------------------------------------------------------------------

    def add_audit(self, entries):
        """
        Append audit entries in one transaction.

        :param entries: mappings with :data:`AUDIT_FIELDS`
        """
        with self._transaction():
            self._db.executemany(
                f"INSERT INTO audit ({', '.join(AUDIT_FIELDS)}) VALUES (?, ?, ?, ?, ?, ?)",
                [[e[f] for f in AUDIT_FIELDS] for e in entries],
            )

    def audit(self, since=None, limit=100, node_id=None):
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
        return [dict(zip(AUDIT_FIELDS, row, strict=True)) for row in rows]

    # -- state copy --------------------------------------------------------------------

    def rows(self, table, columns):
        """:return: every row of a table of :data:`COPY_TABLES`, as lists"""
        order = " ORDER BY id" if table == "audit" else ""
        return [
            list(r)
            for r in self._db.execute(f"SELECT {', '.join(columns)} FROM {table}{order}")
        ]

    def insert_rows(self, table, columns, rows):
        """Add rows to a table of :data:`COPY_TABLES`, in one transaction."""
        with self._transaction():
            self._db.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' * len(columns))})",
                rows,
            )
