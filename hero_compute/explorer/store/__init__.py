"""
The explorer's durable state (CONTRACT §6, §10) behind one narrow interface,
:class:`IStore`, with two backends tested by the same tests: SQLite (:mod:`.sqlite`, one
file, the default) and PostgreSQL (:mod:`.postgres`, shared by several explorers).

:func:`open_store` picks the backend from ``EXPLORER_DATABASE``: a path is SQLite, a
``postgresql://`` URI is PostgreSQL.  Only this package speaks SQL.
"""

from zope.interface import Attribute, Interface

from .schema import (
    AUDIT_FIELDS,
    DURABLE_FIELDS,
    NODE_FIELDS,
    SCHEMA_VERSION,
    Identity,
    StoreError,
    TokenRefused,
    needs_save,
)
from .sqlite import Store

__all__ = [
    "AUDIT_FIELDS",
    "DURABLE_FIELDS",
    "NODE_FIELDS",
    "SCHEMA_VERSION",
    "IStore",
    "Identity",
    "Store",
    "StoreError",
    "TokenRefused",
    "is_postgres",
    "needs_save",
    "open_store",
]


class IStore(Interface):
    """
    What the explorer keeps across restarts, and shares with the other explorers of one
    database.  Every method is synchronous: a shared backend is called from a worker
    thread (see :class:`hero_compute.explorer.state.ExplorerState`), never the reactor,
    except :meth:`identity`, :meth:`is_revoked_serial` and :meth:`ui_token_revoked`,
    which answer from memory.
    """

    kind = Attribute("``sqlite`` or ``postgresql``, as ``explorer.info`` reports it")
    shared = Attribute("whether other explorers may change this store behind our back")
    location = Attribute("where it is, safe to log (never a password)")

    def state():
        """:return: ``up`` or ``down``"""

    def close():
        """Close it; calling it again does nothing."""

    def load_nodes():
        """:return: every stored node record (dicts with :data:`NODE_FIELDS`)"""

    def save_nodes(records):
        """Store many node records in one transaction."""

    def save_node(record):
        """Store one node record."""

    def touch_nodes(last_seen):
        """Move stored ``last_seen`` times forward (node id -> time)."""

    def forget_node(node_id):
        """Drop a node's record; :return: whether there was one."""

    def identity(node_id):
        """:return: the id's :class:`Identity` or ``None``, from memory"""

    def bind_secret(node_id, secret_sha256):
        """Bind on first sight or compare; :return: whether the secret is the bound one."""

    def mark_enrolled(node_id, cert_serial, now):
        """Bind an id to a newly enrolled certificate, revoking the earlier ones."""

    def renew_serial(node_id, old_serial, new_serial, now):
        """Compare-and-swap an id's certificate; :return: whether it swapped."""

    def forget_identity(node_id):
        """Forget an id's binding (a removal); a revocation stays."""

    def add_token(token_hash, node_id, expires_at):
        """Keep a join token's hash."""

    def peek_token(token_hash, now):
        """:return: the node id a live token allows; :raises TokenRefused:"""

    def redeem_token(token_hash, now):
        """Use a token up, atomically; :raises TokenRefused:"""

    def revoke(node_id, now):
        """Revoke an id: its certificates and secret are refused from now on."""

    def revoke_serial(serial, node_id, now):
        """Refuse one certificate from now on."""

    def is_revoked_serial(serial):
        """:return: whether the certificate serial is revoked, from memory"""

    def id_revoked_at(node_id):
        """:return: the last time the id was revoked, or ``None``, from memory"""

    def issued_at(serial):
        """:return: when a certificate was signed here, or ``None``"""

    def add_audit(entries):
        """Append audit entries (dicts with ``AUDIT_FIELDS``) in one transaction."""

    def audit(since=None, limit=100, node_id=None):
        """:return: audit entries, newest first"""

    def knows(node_id):
        """:return: whether anything is held about the id (it may call the server)"""

    def add_ui_token(token_hash, user, role, now, expires_at, limit):
        """Keep a dashboard login token's hash; :return: False if ``limit`` wait"""

    def redeem_ui_token(token_hash, now):
        """Spend a login token atomically; :return: ``(user, role, expires_at)`` or None"""

    def ui_tokens(now):
        """:return: the login tokens not yet expired (metadata only)"""

    def revoke_ui_user(user, now):
        """Revoke a dashboard user's tokens; :return: how many were waiting"""

    def ui_token_revoked(user, token_hash):
        """:return: whether that login token was revoked, from memory"""


def is_postgres(location):
    """
    :param location: ``EXPLORER_DATABASE``: a path or a ``postgresql://`` URI
    :return: whether it names a PostgreSQL database
    """
    return str(location).startswith(("postgresql://", "postgres://"))


def open_store(location, **kwargs):
    """
    Open the store ``location`` names, creating or migrating its schema.

    :param location: a path (SQLite) or a ``postgresql://`` URI
    :param kwargs: passed to the backend's ``open``
    :raises StoreError: it cannot be used (the message says why, never a password)
    :return: an :class:`IStore`
    """
    if is_postgres(location):
        from .postgres import PostgresStore

        return PostgresStore.open(location, **kwargs)
    return Store.open(location, **kwargs)
