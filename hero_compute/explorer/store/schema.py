"""
What the explorer's state file holds, apart from the SQL that reads and writes it (in
:mod:`hero_compute.explorer.store`): the schema and its version, the node record's
fields, the records and errors of the store's API, and the checks on what it is given.

Everything public here is re-exported by :mod:`hero_compute.explorer.store`; import it
from there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import attrs

#: The schema this code writes.  A file with a higher ``PRAGMA user_version`` was made by
#: a newer hero_compute and is refused rather than misread.
SCHEMA_VERSION = 4

#: The columns of a node record, as :class:`hero_compute.explorer.records.NodeRecord`
#: names them; :meth:`Store.load_nodes` returns dicts with exactly these keys.
NODE_FIELDS = (
    "node_id",
    "name",
    "socket_path",
    "transport",
    "version",
    "capacity",
    "usage",
    "vm_count",
    "labels",
    "first_seen",
    "last_seen",
)

#: The fields whose change is worth a write: a restarted explorer must show where each
#: node was and what it was called.  ``usage``, ``vm_count`` and ``last_seen`` change with
#: nearly every heartbeat and are left to :meth:`Store.touch_nodes` or the next save.
DURABLE_FIELDS = ("name", "socket_path", "transport", "version", "capacity", "labels")

JSON_FIELDS = frozenset({"capacity", "usage", "labels"})
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

SCHEMA = (
    """CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY, name TEXT NOT NULL, socket_path TEXT NOT NULL,
        transport TEXT NOT NULL, version TEXT NOT NULL, capacity TEXT NOT NULL,
        usage TEXT NOT NULL, vm_count INTEGER NOT NULL, labels TEXT NOT NULL,
        first_seen REAL NOT NULL, last_seen REAL NOT NULL)""",
    # Serials are lowercase hex text: X.509 serials run to 159 bits, past SQLite's
    # 64-bit integers.
    """CREATE TABLE identities (
        node_id TEXT PRIMARY KEY, secret_sha256 TEXT,
        enrolled INTEGER NOT NULL DEFAULT 0, cert_serial TEXT, previous_serial TEXT,
        revoked_at REAL)""",
    """CREATE TABLE tokens (
        token_hash TEXT PRIMARY KEY, node_id TEXT, expires_at REAL NOT NULL,
        used INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX tokens_by_expiry ON tokens (expires_at)",
    """CREATE TABLE revoked_serials (
        serial TEXT PRIMARY KEY, node_id TEXT NOT NULL, revoked_at REAL NOT NULL)""",
    """CREATE TABLE revoked_secrets (
        secret_sha256 TEXT PRIMARY KEY, node_id TEXT NOT NULL, revoked_at REAL NOT NULL)""",
)

#: Schema 2: revocation that outlives re-enrollment and removal.  ``revoked_ids`` holds
#: the last time each id was revoked (every certificate for it issued before then is
#: refused, those made offline included); ``issued_serials`` the certificates this
#: explorer signed and when, so one signed after a revocation is told from one before.
#: Neither is ever deleted by removing a node.
SCHEMA_2 = (
    """CREATE TABLE revoked_ids (
        node_id TEXT PRIMARY KEY, revoked_at REAL NOT NULL)""",
    """CREATE TABLE issued_serials (
        serial TEXT PRIMARY KEY, node_id TEXT NOT NULL, issued_at REAL NOT NULL)""",
    "CREATE INDEX issued_serials_by_node ON issued_serials (node_id)",
    # A file of schema 1 already holds revocations: carried over, so an upgrade lifts
    # none.
    """INSERT OR IGNORE INTO revoked_ids (node_id, revoked_at)
        SELECT node_id, revoked_at FROM identities WHERE revoked_at IS NOT NULL""",
)

#: Schema 3: the audit log (CONTRACT §10): who changed what, when, with what outcome;
#: never a token, secret, key or user data.
SCHEMA_3 = (
    """CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, explorer TEXT NOT NULL,
        caller TEXT NOT NULL, method TEXT NOT NULL, target TEXT NOT NULL,
        outcome TEXT NOT NULL)""",
    "CREATE INDEX audit_by_time ON audit (time)",
)

#: Schema 4: the dashboard's login tokens (CONTRACT §11), by their SHA-256 only, with
#: who they are for and what became of them.  A used or revoked row is kept until it
#: expires (its session ends then too), so a revocation reaches the sessions it made.
SCHEMA_4 = (
    """CREATE TABLE ui_tokens (
        token_hash TEXT PRIMARY KEY, user_name TEXT NOT NULL, role TEXT NOT NULL,
        created_at REAL NOT NULL, expires_at REAL NOT NULL, used_at REAL,
        revoked_at REAL)""",
    "CREATE INDEX ui_tokens_by_user ON ui_tokens (user_name)",
    "CREATE INDEX ui_tokens_by_expiry ON ui_tokens (expires_at)",
)

#: What brings a file of each older schema version to the next one.
MIGRATIONS = {1: SCHEMA_2, 2: SCHEMA_3, 3: SCHEMA_4}

#: The columns of a dashboard login token's row (never the token: its hash).
UI_TOKEN_FIELDS = (
    "token_hash",
    "user_name",
    "role",
    "created_at",
    "expires_at",
    "used_at",
    "revoked_at",
)

#: The fields of an audit entry, in ``explorer.audit``'s order.
AUDIT_FIELDS = ("time", "explorer", "caller", "method", "target", "outcome")


class StoreError(Exception):
    """The state file cannot be used: not a database, damaged, or from a newer version."""


class TokenRefused(Exception):
    """The token is unknown, used or expired: one exception, so no caller can tell which."""


@attrs.frozen
class Identity:
    """
    What the explorer holds about one node id's credentials.

    :ivar secret_sha256: hex SHA-256 of the node secret bound to the id, or ``None``
    :ivar enrolled: the id is bound to certificates issued by enrollment or renewal;
        non-TLS heartbeats for it are refused
    :ivar cert_serial: serial (an ``int``) of its current certificate, or ``None``
    :ivar previous_serial: serial of the certificate the current one renewed, still
        accepted so connections opened before a renewal keep working
    :ivar revoked: the id is revoked: refused until it enrolls again
    """

    node_id: str
    secret_sha256: str | None
    enrolled: bool
    cert_serial: int | None
    previous_serial: int | None
    revoked: bool


def needs_save(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """
    Whether a node's record changed in a way worth writing.

    :param old: the previous record (a mapping with :data:`NODE_FIELDS`), or ``None``
        on first sight
    :param new: the new record
    :return: ``True`` when :meth:`Store.save_node` should be called
    """
    return old is None or any(old[f] != new[f] for f in DURABLE_FIELDS)


def check_sha256(value: object, what: str) -> str:
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
        # Catches the costly mistake of handing the store a token or secret in clear.
        raise ValueError(f"{what} must be 64 lowercase hex characters (a SHA-256)")
    return value


def serial_text(serial: object) -> str:
    if not isinstance(serial, int) or isinstance(serial, bool) or serial < 0:
        raise ValueError(f"a certificate serial must be a non-negative int, not {serial!r}")
    return format(serial, "x")


def create_private(path: str | os.PathLike[str]) -> None:
    """Create the state file 0600 and its directory 0700 when they are missing."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
        os.chmod(parent, 0o700)  # makedirs' mode is subject to the umask
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


#: What ``hero-compute state copy`` carries, table by table, in an order that suits any
#: future foreign keys: everything the store holds (CONTRACT §10).
COPY_TABLES = {
    "nodes": NODE_FIELDS,
    "identities": (
        "node_id",
        "secret_sha256",
        "enrolled",
        "cert_serial",
        "previous_serial",
        "revoked_at",
    ),
    "tokens": ("token_hash", "node_id", "expires_at", "used"),
    "revoked_serials": ("serial", "node_id", "revoked_at"),
    "revoked_secrets": ("secret_sha256", "node_id", "revoked_at"),
    "revoked_ids": ("node_id", "revoked_at"),
    "issued_serials": ("serial", "node_id", "issued_at"),
    "audit": AUDIT_FIELDS,
    "ui_tokens": UI_TOKEN_FIELDS,
}
