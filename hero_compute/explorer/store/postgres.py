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

Long because: like :mod:`.sqlite`, every statement on the shared state is reviewed in
one place.
"""

import contextlib
import json
import threading

import psycopg
from psycopg.conninfo import conninfo_to_dict
from twisted.logger import Logger

from hero_compute.rpc.errors import StoreUnavailable

from .migrations import LATEST, POSTGRES
from .schema import (
    AUDIT_FIELDS,
    JSON_FIELDS,
    NODE_FIELDS,
    Identity,
    StoreError,
    TokenRefused,
    check_sha256,
    serial_text,
)
from .watch import CHANNEL, Watcher

log = Logger()

#: ``pg_advisory_lock`` keys: one for migrations, one for every identity write.
MIGRATE_LOCK = 0x6865726F00
WRITE_LOCK = 0x6865726F01

#: Seconds to wait for a connection to the server.
CONNECT_TIMEOUT = 3

_IDENTITY = (
    "SELECT node_id, secret_sha256, enrolled, cert_serial, previous_serial, revoked_at "
    "FROM identities"
)


def redact(dsn):
    """
    :param dsn: a libpq connection string or ``postgresql://`` URI
    :return: ``postgresql://user@host:port/dbname``, safe to log: never a password
    """
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "postgresql://(unparsable URI)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = parts.get("host", "")
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname', '')}"


def _identity(row):
    node_id, secret, enrolled, serial, previous, revoked_at = row
    return Identity(
        node_id=node_id,
        secret_sha256=secret,
        enrolled=bool(enrolled),
        cert_serial=None if serial is None else int(serial, 16),
        previous_serial=None if previous is None else int(previous, 16),
        revoked=revoked_at is not None,
    )


class PostgresStore:
    """
    The explorer's state in a PostgreSQL database.  Open with :meth:`open`.

    :ivar location: the database, safe to log
    """

    kind = "postgresql"
    shared = True

    def __init__(self, dsn, conn):
        self._dsn = dsn
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
        self._watcher = None

    @classmethod
    def open(cls, dsn, watch=True):
        """
        Connect, migrate the schema under a lock, load the mirror and start watching.

        :param dsn: a ``postgresql://`` URI (libpq form; the password from it,
            ``PGPASSWORD`` or ``PGPASSFILE``)
        :param watch: follow the other explorers' changes (off for ``state copy``)
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
        try:
            conn = _connect(dsn)
        except psycopg.Error as e:
            raise StoreError(f"{redact(dsn)}: cannot connect ({_reason(e)})") from None
        store = cls(dsn, conn)
        try:
            store._migrate()
            with store._mirror:
                store._reload(conn)
        except BaseException:
            conn.close()
            raise
        if watch:
            store._watcher = Watcher(dsn, store, _connect)
            store._watcher.start()
        return store

    def _migrate(self):
        conn = self._conn
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

    def _reload(self, conn):
        """Read the whole mirror again (at start, and after the database was away)."""
        seq = conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
        self._identities = {row[0]: _identity(row) for row in conn.execute(_IDENTITY)}
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
        return seq

    def refresh(self, conn, node_ids):
        """Re-read some ids into the mirror (the watcher, for others' changes)."""
        ids = list(node_ids)
        rows = conn.execute(_IDENTITY + " WHERE node_id = ANY(%s)", (ids,)).fetchall()
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
        found = {row[0]: _identity(row) for row in rows}
        for node_id in ids:
            if node_id in found:
                self._identities[node_id] = found[node_id]
            else:
                self._identities.pop(node_id, None)
        self._revoked_serials.update(int(s, 16) for (s,) in serials)
        self._revoked_ids.update(revoked)
        self._issued_at.update((int(s, 16), at) for s, at in issued)

    def state(self):
        """:return: ``up`` or ``down``, as the watcher last saw the server"""
        if self._watcher is None:
            return "up" if self._conn is not None else "down"
        return self._watcher.state

    def close(self):
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
    def _use(self, write=False):
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
                    self._conn = _connect(self._dsn)
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

    def _changed(self, conn, node_id):
        """Tell the other explorers (inside the writing transaction) and ourselves."""
        conn.execute(
            "INSERT INTO changes (node_id, at) VALUES (%s, extract(epoch FROM now()))",
            (node_id,),
        )
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, node_id))

    def _mine(self, conn, node_id):
        # Our own write, seen at once (the others see it within the watcher's poll).
        with self._mirror:
            self.refresh(conn, [node_id])

    # -- nodes -------------------------------------------------------------------------

    def load_nodes(self):
        """:return: every stored node record, as :meth:`Store.load_nodes`"""
        with self._use() as conn:
            rows = conn.execute(
                f"SELECT {', '.join(NODE_FIELDS)} FROM nodes ORDER BY node_id"
            ).fetchall()
        nodes = []
        for row in rows:
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
        """Store one node record."""
        self.save_nodes([record])

    def save_nodes(self, records):
        """Store many node records in one transaction."""
        rows = [
            [
                json.dumps(record[f], sort_keys=True, allow_nan=False)
                if f in JSON_FIELDS
                else record[f]
                for f in NODE_FIELDS
            ]
            for record in records
        ]
        updates = ", ".join(f"{f} = excluded.{f}" for f in NODE_FIELDS[1:])
        with self._use() as conn, conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO nodes ({', '.join(NODE_FIELDS)}) "
                f"VALUES ({', '.join(['%s'] * len(NODE_FIELDS))}) "
                f"ON CONFLICT (node_id) DO UPDATE SET {updates}",
                rows,
            )

    def touch_nodes(self, last_seen):
        """Move stored ``last_seen`` times forward."""
        if not last_seen:
            return
        with self._use() as conn, conn.cursor() as cur:
            cur.executemany(
                "UPDATE nodes SET last_seen = %s WHERE node_id = %s AND last_seen < %s",
                [(seen, node_id, seen) for node_id, seen in last_seen.items()],
            )

    def forget_node(self, node_id):
        """:return: whether there was a record to drop"""
        with self._use() as conn:
            cur = conn.execute("DELETE FROM nodes WHERE node_id = %s", (node_id,))
            return cur.rowcount > 0

    # -- identities --------------------------------------------------------------------

    def identity(self, node_id):
        """:return: the id's :class:`Identity`, or ``None``: from memory"""
        return self._identities.get(node_id)

    def _row(self, conn, node_id):
        return conn.execute(_IDENTITY + " WHERE node_id = %s", (node_id,)).fetchone()

    def bind_secret(self, node_id, secret_sha256):
        """Bind a secret on first sight, or compare it (as :meth:`Store.bind_secret`)."""
        check_sha256(secret_sha256, "secret_sha256")
        with self._use(write=True) as conn:
            if conn.execute(
                "SELECT 1 FROM revoked_secrets WHERE secret_sha256 = %s", (secret_sha256,)
            ).fetchone():
                return False
            row = self._row(conn, node_id)
            if row is None:
                conn.execute(
                    "INSERT INTO identities (node_id, secret_sha256) VALUES (%s, %s)",
                    (node_id, secret_sha256),
                )
                ok = True
            elif row[5] is not None:
                ok = False
            elif row[1] is None:
                conn.execute(
                    "UPDATE identities SET secret_sha256 = %s WHERE node_id = %s",
                    (secret_sha256, node_id),
                )
                ok = True
            else:
                ok = row[1] == secret_sha256
            if ok and (row is None or row[1] is None):
                self._changed(conn, node_id)
            self._mine(conn, node_id)
            return ok

    def mark_enrolled(self, node_id, cert_serial, now):
        """Bind an id to a newly enrolled certificate (as :meth:`Store.mark_enrolled`)."""
        new = serial_text(cert_serial)
        with self._use(write=True) as conn:
            row = self._row(conn, node_id)
            if row is None:
                conn.execute("INSERT INTO identities (node_id) VALUES (%s)", (node_id,))
            else:
                self._revoke_serials(conn, node_id, (row[3], row[4]), now, keep=new)
            conn.execute(
                "UPDATE identities SET enrolled = 1, cert_serial = %s, "
                "previous_serial = NULL, revoked_at = NULL WHERE node_id = %s",
                (new, node_id),
            )
            self._issued(conn, new, node_id, now)
            self._changed(conn, node_id)
            self._mine(conn, node_id)

    def renew_serial(self, node_id, old_serial, new_serial, now):
        """Compare-and-swap an id's certificate (as :meth:`Store.renew_serial`)."""
        old, new = serial_text(old_serial), serial_text(new_serial)
        with self._use(write=True) as conn:
            row = self._row(conn, node_id)
            if row is None:
                conn.execute("INSERT INTO identities (node_id) VALUES (%s)", (node_id,))
            elif row[5] is not None or (row[2] and row[3] != old):
                return False
            else:
                self._revoke_serials(conn, node_id, (row[4],), now, keep=old)
            conn.execute(
                "UPDATE identities SET enrolled = 1, cert_serial = %s, "
                "previous_serial = %s WHERE node_id = %s",
                (new, old, node_id),
            )
            self._issued(conn, new, node_id, now)
            self._changed(conn, node_id)
            self._mine(conn, node_id)
            return True

    def _issued(self, conn, serial, node_id, now):
        conn.execute(
            "INSERT INTO issued_serials VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (serial, node_id, now),
        )

    def issued_at(self, serial):
        """
        :return: when a certificate was signed by an explorer of this database, for
            ids ever revoked (the only ones asked about), or ``None``: from memory
        """
        return self._issued_at.get(serial)

    def knows(self, node_id):
        """:return: whether anything is held about the id (as :meth:`Store.knows`)"""
        if node_id in self._revoked_ids or self.identity(node_id) is not None:
            return True
        with self._use() as conn:
            return any(
                conn.execute(
                    f"SELECT 1 FROM {table} WHERE node_id = %s LIMIT 1", (node_id,)
                ).fetchone()
                for table in ("nodes", "revoked_serials", "issued_serials")
            )

    def forget_identity(self, node_id):
        """Forget an id's binding; a revocation stays (as :meth:`Store.forget_identity`)."""
        with self._use(write=True) as conn:
            conn.execute(
                "DELETE FROM identities WHERE node_id = %s AND revoked_at IS NULL",
                (node_id,),
            )
            self._changed(conn, node_id)
            self._mine(conn, node_id)

    # -- tokens ------------------------------------------------------------------------

    def add_token(self, token_hash, node_id, expires_at):
        """Keep a join token by its hash."""
        check_sha256(token_hash, "token_hash")
        with self._use() as conn:
            conn.execute(
                "INSERT INTO tokens (token_hash, node_id, expires_at) VALUES (%s, %s, %s)",
                (token_hash, node_id, expires_at),
            )

    def peek_token(self, token_hash, now):
        """:return: the node id a live token allows; :raises TokenRefused:"""
        with self._use() as conn:
            row = conn.execute(
                "SELECT node_id FROM tokens WHERE token_hash = %s AND used = 0 "
                "AND expires_at > %s",
                (check_sha256(token_hash, "token_hash"), now),
            ).fetchone()
        if row is None:
            raise TokenRefused()
        return row[0]

    def redeem_token(self, token_hash, now):
        """Use a token up, atomically across every explorer; :raises TokenRefused:"""
        check_sha256(token_hash, "token_hash")
        with self._use(write=True) as conn:
            conn.execute("DELETE FROM tokens WHERE expires_at <= %s", (now,))
            row = conn.execute(
                "UPDATE tokens SET used = 1 WHERE token_hash = %s AND used = 0 "
                "RETURNING node_id",
                (token_hash,),
            ).fetchone()
        if row is None:
            raise TokenRefused()
        return row[0]

    # -- revocation --------------------------------------------------------------------

    def revoke(self, node_id, now):
        """Revoke an id (as :meth:`Store.revoke`)."""
        with self._use(write=True) as conn:
            row = self._row(conn, node_id)
            if row is None:
                conn.execute("INSERT INTO identities (node_id) VALUES (%s)", (node_id,))
            else:
                self._revoke_serials(conn, node_id, (row[3], row[4]), now)
                if row[1] is not None:
                    conn.execute(
                        "INSERT INTO revoked_secrets VALUES (%s, %s, %s) "
                        "ON CONFLICT DO NOTHING",
                        (row[1], node_id, now),
                    )
            conn.execute(
                "UPDATE identities SET secret_sha256 = NULL, enrolled = 0, "
                "cert_serial = NULL, previous_serial = NULL, "
                "revoked_at = coalesce(revoked_at, %s) WHERE node_id = %s",
                (now, node_id),
            )
            # The latest revocation counts: it covers every certificate issued before.
            conn.execute(
                "INSERT INTO revoked_ids VALUES (%s, %s) ON CONFLICT (node_id) "
                "DO UPDATE SET revoked_at = greatest(revoked_ids.revoked_at, "
                "excluded.revoked_at)",
                (node_id, now),
            )
            self._changed(conn, node_id)
            self._mine(conn, node_id)

    def revoke_serial(self, serial, node_id, now):
        """Refuse one certificate from now on."""
        with self._use(write=True) as conn:
            self._revoke_serials(conn, node_id, (serial_text(serial),), now)
            self._changed(conn, node_id)
            self._mine(conn, node_id)

    def _revoke_serials(self, conn, node_id, serials, now, keep=None):
        revoked = [s for s in serials if s is not None and s != keep]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO revoked_serials VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                [(s, node_id, now) for s in revoked],
            )

    def is_revoked_serial(self, serial):
        """:return: whether the serial is revoked: from memory"""
        return serial in self._revoked_serials

    def id_revoked_at(self, node_id):
        """:return: the last time the id was revoked, or ``None``: from memory"""
        return self._revoked_ids.get(node_id)

    # -- audit -------------------------------------------------------------------------

    def add_audit(self, entries):
        """Append audit entries in one transaction."""
        with self._use() as conn, conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO audit ({', '.join(AUDIT_FIELDS)}) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                [[e[f] for f in AUDIT_FIELDS] for e in entries],
            )

    def audit(self, since=None, limit=100, node_id=None):
        """:return: audit entries, newest first (as :meth:`Store.audit`)"""
        with self._use() as conn:
            rows = conn.execute(
                f"SELECT {', '.join(AUDIT_FIELDS)} FROM audit WHERE time >= %(since)s "
                "AND (%(node)s::text IS NULL OR target = %(node)s "
                "OR starts_with(target, %(node)s || '/')) ORDER BY id DESC LIMIT %(limit)s",
                {"since": since or 0, "node": node_id, "limit": limit},
            ).fetchall()
        return [dict(zip(AUDIT_FIELDS, row, strict=True)) for row in rows]

    # -- state copy --------------------------------------------------------------------

    def rows(self, table, columns):
        """:return: every row of a table of :data:`COPY_TABLES`, as lists"""
        with self._use() as conn:
            return [
                list(r)
                for r in conn.execute(
                    f"SELECT {', '.join(columns)} FROM {table}{_order(table)}"
                )
            ]

    def insert_rows(self, table, columns, rows):
        """Add rows to a table of :data:`COPY_TABLES`, in one transaction."""
        with self._use(write=True) as conn, conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) "
                f"VALUES ({', '.join(['%s'] * len(columns))})",
                rows,
            )


def _order(table):
    # The audit log keeps its order through a copy (a new id per row).
    return " ORDER BY id" if table == "audit" else ""


def _connect(dsn):
    return psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)


def _reason(error):
    # libpq's messages name host, port and user, never the password; keep the first
    # line only (the rest is hints about the server's log).
    return (
        str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    )
