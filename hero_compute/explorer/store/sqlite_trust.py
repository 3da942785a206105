"""
The SQLite store's statements on who a node is (CONTRACT §9, §10): identities (secret
bindings, enrollment, the current and previous certificate), join tokens (as hashes
only) and revocations.  :class:`~.sqlite.Store` is built on it; the file, its schema,
its transactions and the node records are there.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from .rows import identity
from .schema import TokenRefused, check_sha256, serial_text

if TYPE_CHECKING:
    from .schema import Identity


class SqliteTrust:
    """
    Identities, tokens and revocations in the state file, with the in-memory copies
    heartbeats read.  A base of :class:`~.sqlite.Store`, which owns the fields.
    """

    __slots__ = ()

    _db: sqlite3.Connection
    _identities: dict
    _revoked_serials: set
    _revoked_ids: dict
    _issued_at: dict
    _transaction: Callable[[], AbstractContextManager[None]]

    # -- identities --------------------------------------------------------------------

    def _identity_row(self, node_id):
        return self._db.execute(
            "SELECT secret_sha256, enrolled, cert_serial, previous_serial, revoked_at "
            "FROM identities WHERE node_id = ?",
            (node_id,),
        ).fetchone()

    def identity(self, node_id: str) -> Identity | None:
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
        return identity((node_id, *row))

    def bind_secret(self, node_id: str, secret_sha256: str) -> bool:
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

    def mark_enrolled(self, node_id: str, cert_serial: int, now: float) -> None:
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

    def renew_serial(
        self, node_id: str, old_serial: int, new_serial: int, now: float
    ) -> bool:
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

    def _issued(self, serial, node_id, now) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO issued_serials VALUES (?, ?, ?)", (serial, node_id, now)
        )
        self._issued_at.pop(int(serial, 16), None)

    def issued_at(self, serial: int) -> float | None:
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

    def knows(self, node_id: str) -> bool:
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

    def forget_identity(self, node_id: str) -> None:
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

    def add_token(self, token_hash: str, node_id: str | None, expires_at: float) -> None:
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

    def peek_token(self, token_hash: str, now: float) -> str | None:
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

    def redeem_token(self, token_hash: str, now: float) -> str | None:
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

    def _purge_tokens(self, now) -> None:
        # Used tokens are kept until they expire, so the record shows they were used.
        self._db.execute("DELETE FROM tokens WHERE expires_at <= ?", (now,))

    # -- revocation --------------------------------------------------------------------

    def revoke(self, node_id: str, now: float) -> None:
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

    def revoke_serial(self, serial: int, node_id: str, now: float) -> None:
        """Refuse one certificate from now on, e.g. one signed but never handed out."""
        with self._transaction():
            self._revoke_serials(node_id, (serial_text(serial),), now)

    def _revoke_serials(self, node_id, serials, now, keep=None) -> None:
        revoked = [s for s in serials if s is not None and s != keep]
        self._db.executemany(
            "INSERT OR IGNORE INTO revoked_serials VALUES (?, ?, ?)",
            [(s, node_id, now) for s in revoked],
        )
        self._revoked_serials.update(int(s, 16) for s in revoked)

    def is_revoked_serial(self, serial: int) -> bool:
        """:return: whether the certificate with this serial has been revoked"""
        return serial in self._revoked_serials

    def id_revoked_at(self, node_id: str) -> float | None:
        """
        :return: the last time the id was revoked (kept through re-enrollment and
            removal), or ``None`` if it never was
        """
        return self._revoked_ids.get(node_id)
