"""
:class:`IStore`, the one narrow interface both backends provide (in a module of its own
so that each backend can declare it without importing the package that picks them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from .schema import Identity


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

    def state() -> str:
        """:return: ``up`` or ``down``"""

    def close() -> None:
        """Close it; calling it again does nothing."""

    def load_nodes() -> list[dict[str, Any]]:
        """:return: every stored node record (dicts with :data:`NODE_FIELDS`)"""

    def save_nodes(records: Iterable[Mapping[str, Any]]) -> None:
        """Store many node records in one transaction."""

    def save_node(record: Mapping[str, Any]) -> None:
        """Store one node record."""

    def touch_nodes(last_seen: Mapping[str, float]) -> None:
        """Move stored ``last_seen`` times forward (node id -> time)."""

    def forget_node(node_id: str) -> bool:
        """Drop a node's record; :return: whether there was one."""

    def identity(node_id: str) -> Identity | None:
        """:return: the id's :class:`Identity` or ``None``, from memory"""

    def bind_secret(node_id: str, secret_sha256: str) -> bool:
        """Bind on first sight or compare; :return: whether the secret is the bound one."""

    def mark_enrolled(node_id: str, cert_serial: int, now: float) -> None:
        """Bind an id to a newly enrolled certificate, revoking the earlier ones."""

    def renew_serial(node_id: str, old_serial: int, new_serial: int, now: float) -> bool:
        """Compare-and-swap an id's certificate; :return: whether it swapped."""

    def forget_identity(node_id: str) -> None:
        """Forget an id's binding (a removal); a revocation stays."""

    def add_token(token_hash: str, node_id: str | None, expires_at: float) -> None:
        """Keep a join token's hash."""

    def peek_token(token_hash: str, now: float) -> str | None:
        """:return: the node id a live token allows; :raises TokenRefused:"""

    def redeem_token(token_hash: str, now: float) -> str | None:
        """Use a token up, atomically; :raises TokenRefused:"""

    def revoke(node_id: str, now: float) -> None:
        """Revoke an id: its certificates and secret are refused from now on."""

    def revoke_serial(serial: int, node_id: str, now: float) -> None:
        """Refuse one certificate from now on."""

    def is_revoked_serial(serial: int) -> bool:
        """:return: whether the certificate serial is revoked, from memory"""

    def id_revoked_at(node_id: str) -> float | None:
        """:return: the last time the id was revoked, or ``None``, from memory"""

    def issued_at(serial: int) -> float | None:
        """:return: when a certificate was signed here, or ``None``"""

    def add_audit(entries: Iterable[Mapping[str, Any]]) -> None:
        """Append audit entries (dicts with ``AUDIT_FIELDS``) in one transaction."""

    def audit(
        since: float | None = None, limit: int = 100, node_id: str | None = None
    ) -> list[dict[str, Any]]:
        """:return: audit entries, newest first"""

    def knows(node_id: str) -> bool:
        """:return: whether anything is held about the id (it may call the server)"""

    def add_ui_token(
        token_hash: str,
        user: str,
        role: str,
        now: float,
        expires_at: float,
        limit: int,
    ) -> bool:
        """Keep a dashboard login token's hash; :return: False if ``limit`` wait"""

    def redeem_ui_token(token_hash: str, now: float) -> tuple[Any, ...] | None:
        """Spend a login token atomically; :return: ``(user, role, expires_at)`` or None"""

    def ui_tokens(now: float) -> list[dict[str, Any]]:
        """:return: the login tokens not yet expired (metadata only)"""

    def revoke_ui_user(user: str, now: float) -> int:
        """Revoke a dashboard user's tokens; :return: how many were waiting"""

    def ui_token_revoked(user: str, token_hash: str) -> bool:
        """:return: whether that login token was revoked, from memory"""

    def rows(table: str, columns: Sequence[str]) -> list[list[Any]]:
        """:return: every row of a table of ``COPY_TABLES``, as lists (``state copy``)"""

    def insert_rows(
        table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> None:
        """Append rows to a table of ``COPY_TABLES`` in one transaction (``state copy``)."""
