"""
The PostgreSQL store's statements on who a node is (CONTRACT §9, §10): identities,
join tokens (as hashes only) and revocations, each write under the fleet-wide write
lock and announced to the other explorers.  :class:`~.postgres.PostgresStore` is built
on it; the connection, the mirror and the node records are there.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from .rows import SELECT_IDENTITY
from .schema import TokenRefused, check_sha256, serial_text

if TYPE_CHECKING:
    from .schema import Identity


class PostgresTrust:
    """
    Identities, tokens and revocations in the shared database; reads answered from
    the mirror.  A base of :class:`~.postgres.PostgresStore`, which owns the state.
    """

    _identities: dict
    _revoked_serials: set
    _revoked_ids: dict
    _issued_at: dict
    _use: Callable[..., AbstractContextManager[Any]]
    _changed: Callable[[Any, str], None]
    _mine: Callable[[Any, str], None]

    # -- identities --------------------------------------------------------------------

    def identity(self, node_id: str) -> Identity | None:
        """:return: the id's :class:`Identity`, or ``None``: from memory"""
        return self._identities.get(node_id)

    def _row(self, conn, node_id):
        return conn.execute(SELECT_IDENTITY + " WHERE node_id = %s", (node_id,)).fetchone()

    def bind_secret(self, node_id: str, secret_sha256: str) -> bool:
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

    def mark_enrolled(self, node_id: str, cert_serial: int, now: float) -> None:
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

    def renew_serial(
        self, node_id: str, old_serial: int, new_serial: int, now: float
    ) -> bool:
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

    def _issued(self, conn, serial, node_id, now) -> None:
        conn.execute(
            "INSERT INTO issued_serials VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (serial, node_id, now),
        )

    def issued_at(self, serial: int) -> float | None:
        """
        :return: when a certificate was signed by an explorer of this database, for
            ids ever revoked (the only ones asked about), or ``None``: from memory
        """
        return self._issued_at.get(serial)

    def knows(self, node_id: str) -> bool:
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

    def forget_identity(self, node_id: str) -> None:
        """Forget an id's binding; a revocation stays (as :meth:`Store.forget_identity`)."""
        with self._use(write=True) as conn:
            conn.execute(
                "DELETE FROM identities WHERE node_id = %s AND revoked_at IS NULL",
                (node_id,),
            )
            self._changed(conn, node_id)
            self._mine(conn, node_id)

    # -- tokens ------------------------------------------------------------------------

    def add_token(self, token_hash: str, node_id: str | None, expires_at: float) -> None:
        """Keep a join token by its hash."""
        check_sha256(token_hash, "token_hash")
        with self._use() as conn:
            conn.execute(
                "INSERT INTO tokens (token_hash, node_id, expires_at) VALUES (%s, %s, %s)",
                (token_hash, node_id, expires_at),
            )

    def peek_token(self, token_hash: str, now: float) -> str | None:
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

    def redeem_token(self, token_hash: str, now: float) -> str | None:
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

    def revoke(self, node_id: str, now: float) -> None:
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

    def revoke_serial(self, serial: int, node_id: str, now: float) -> None:
        """Refuse one certificate from now on."""
        with self._use(write=True) as conn:
            self._revoke_serials(conn, node_id, (serial_text(serial),), now)
            self._changed(conn, node_id)
            self._mine(conn, node_id)

    def _revoke_serials(self, conn, node_id, serials, now, keep=None) -> None:
        revoked = [s for s in serials if s is not None and s != keep]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO revoked_serials VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                [(s, node_id, now) for s in revoked],
            )

    def is_revoked_serial(self, serial: int) -> bool:
        """:return: whether the serial is revoked: from memory"""
        return serial in self._revoked_serials

    def id_revoked_at(self, node_id: str) -> float | None:
        """:return: the last time the id was revoked, or ``None``: from memory"""
        return self._revoked_ids.get(node_id)
