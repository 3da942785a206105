"""
The dashboard's login tokens in the store (CONTRACT §11), on both backends: one row per
token, keyed by the token's SHA-256 (never the token), with its user, role, and when it
was made, expires, was used and was revoked.

A token is spent by one atomic update (of two redeems, at one explorer or two, only one
wins), so a login checks the store itself: nothing about a token is trusted from memory.
What the explorers' sessions need on every request, whether the token they were made
from has since been revoked, is a mirror in memory: our own revocations update it, and
with PostgreSQL the other explorers' arrive as ``ui`` rows of the ``changes`` table
(:mod:`.watch`), within its poll.

Rows go once they expire, used, revoked or not: on the next token made or user revoked.
A used or revoked row is kept until then because the session it made lasts as long,
and a revocation must still reach that session.  So the table holds at most the tokens
made in the last :data:`~hero_compute.explorer.ui_accounts.MAX_TTL` (30 days).
"""

import sqlite3
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

from .schema import check_sha256

#: What :meth:`redeem_ui_token` answers for a live token.
_LIVE = "user_name, role, expires_at"

_WAITING = "used_at IS NULL AND revoked_at IS NULL"


def _listing(rows):
    return [
        {
            "user": user,
            "role": role,
            "created_at": created,
            "expires_at": expires,
            "used": used is not None,
            "revoked": revoked is not None,
        }
        for user, role, created, expires, used, revoked in rows
    ]


_SELECT_LISTING = (
    "SELECT user_name, role, created_at, expires_at, used_at, revoked_at FROM ui_tokens "
    "WHERE expires_at > {} ORDER BY user_name, expires_at, role"
)


def _by_user(rows):
    revoked: dict[str, set] = {}
    for user, token_hash in rows:
        revoked.setdefault(user, set()).add(token_hash)
    return {user: frozenset(hashes) for user, hashes in revoked.items()}


class SqliteUiTokens:
    """The dashboard's login tokens in SQLite; a base of :class:`~.sqlite.Store`."""

    __slots__ = ()

    _db: sqlite3.Connection
    _ui_revoked: dict
    _transaction: Callable[[], AbstractContextManager[None]]

    def _load_ui(self):
        self._ui_revoked.update(
            _by_user(
                self._db.execute(
                    "SELECT user_name, token_hash FROM ui_tokens "
                    "WHERE revoked_at IS NOT NULL"
                )
            )
        )

    def add_ui_token(
        self,
        token_hash: str,
        user: str,
        role: str,
        now: float,
        expires_at: float,
        limit: int,
    ) -> bool:
        """
        Keep a login token by its hash, unless ``limit`` tokens already wait to be used.
        Expired rows are purged on the way.

        :param token_hash: hex SHA-256 of the token
        :return: whether it was kept
        """
        check_sha256(token_hash, "token_hash")
        with self._transaction():
            self._db.execute("DELETE FROM ui_tokens WHERE expires_at <= ?", (now,))
            (waiting,) = self._db.execute(
                f"SELECT count(*) FROM ui_tokens WHERE {_WAITING}"
            ).fetchone()
            if waiting >= limit:
                return False
            self._db.execute(
                "INSERT INTO ui_tokens (token_hash, user_name, role, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?)",
                (token_hash, user, role, now, expires_at),
            )
            return True

    def redeem_ui_token(self, token_hash: str, now: float) -> tuple[Any, ...] | None:
        """
        Spend a login token, atomically: of two redeems only one succeeds.

        :return: ``(user, role, expires_at)``, or ``None`` when the token is unknown,
            used, revoked or expired
        """
        check_sha256(token_hash, "token_hash")
        with self._transaction():
            row = self._db.execute(
                f"SELECT {_LIVE} FROM ui_tokens WHERE token_hash = ? AND {_WAITING} "
                "AND expires_at > ?",
                (token_hash, now),
            ).fetchone()
            if row is not None:
                self._db.execute(
                    "UPDATE ui_tokens SET used_at = ? WHERE token_hash = ?",
                    (now, token_hash),
                )
        return None if row is None else tuple(row)

    def ui_tokens(self, now: float) -> list[dict[str, Any]]:
        """
        :return: the tokens not yet expired, never a token or its hash: dicts of
            ``user, role, created_at, expires_at, used, revoked``, by user and expiry
        """
        return _listing(
            self._db.execute(
                _SELECT_LISTING.format("?"),
                (now,),
            )
        )

    def revoke_ui_user(self, user: str, now: float) -> int:
        """
        Revoke every token of a user not yet expired, used ones included (their
        sessions end too).  Expired rows are purged on the way.

        :return: how many of them were still waiting to be used
        """
        with self._transaction():
            self._db.execute("DELETE FROM ui_tokens WHERE expires_at <= ?", (now,))
            (waiting,) = self._db.execute(
                f"SELECT count(*) FROM ui_tokens WHERE user_name = ? AND {_WAITING}",
                (user,),
            ).fetchone()
            self._db.execute(
                "UPDATE ui_tokens SET revoked_at = ? WHERE user_name = ? "
                "AND revoked_at IS NULL",
                (now, user),
            )
            hashes = self._db.execute(
                "SELECT token_hash FROM ui_tokens WHERE user_name = ? "
                "AND revoked_at IS NOT NULL",
                (user,),
            ).fetchall()
        self._ui_revoked[user] = frozenset(h for (h,) in hashes)
        return waiting

    def ui_token_revoked(self, user: str, token_hash: str) -> bool:
        """:return: whether the user's token (a hash) was revoked: from memory"""
        return token_hash in self._ui_revoked.get(user, ())


class PostgresUiTokens:
    """
    The dashboard's login tokens in the shared database; a base of
    :class:`~.postgres.PostgresStore`.  Revocations are announced to the other
    explorers as ``ui`` changes.
    """

    _ui_revoked: dict
    _mirror: Any
    _use: Callable[..., AbstractContextManager[Any]]
    _changed: Callable[..., None]

    def _load_ui(self, conn):
        self._ui_revoked = _by_user(
            conn.execute(
                "SELECT user_name, token_hash FROM ui_tokens WHERE revoked_at IS NOT NULL"
            )
        )

    def refresh_ui(self, conn: Any, users: Iterable[str]) -> None:
        """Re-read some users' revoked tokens into the mirror (the watcher)."""
        users = list(users)
        found = _by_user(
            conn.execute(
                "SELECT user_name, token_hash FROM ui_tokens WHERE user_name = ANY(%s) "
                "AND revoked_at IS NOT NULL",
                (users,),
            )
        )
        for user in users:
            self._ui_revoked[user] = found.get(user, frozenset())

    def add_ui_token(
        self,
        token_hash: str,
        user: str,
        role: str,
        now: float,
        expires_at: float,
        limit: int,
    ) -> bool:
        """Keep a login token by its hash (as :meth:`Store.add_ui_token`)."""
        check_sha256(token_hash, "token_hash")
        # Under the write lock: two explorers counting at once cannot both pass the limit.
        with self._use(write=True) as conn:
            conn.execute("DELETE FROM ui_tokens WHERE expires_at <= %s", (now,))
            (waiting,) = conn.execute(
                f"SELECT count(*) FROM ui_tokens WHERE {_WAITING}"
            ).fetchone()
            if waiting >= limit:
                return False
            conn.execute(
                "INSERT INTO ui_tokens (token_hash, user_name, role, created_at, "
                "expires_at) VALUES (%s, %s, %s, %s, %s)",
                (token_hash, user, role, now, expires_at),
            )
            return True

    def redeem_ui_token(self, token_hash: str, now: float) -> tuple[Any, ...] | None:
        """Spend a login token, atomically across every explorer (one update)."""
        check_sha256(token_hash, "token_hash")
        with self._use() as conn:
            row = conn.execute(
                f"UPDATE ui_tokens SET used_at = %s WHERE token_hash = %s AND {_WAITING} "
                f"AND expires_at > %s RETURNING {_LIVE}",
                (now, token_hash, now),
            ).fetchone()
        return None if row is None else tuple(row)

    def ui_tokens(self, now: float) -> list[dict[str, Any]]:
        """:return: the tokens not yet expired (as :meth:`Store.ui_tokens`)"""
        with self._use() as conn:
            rows = conn.execute(
                _SELECT_LISTING.format("%s"),
                (now,),
            ).fetchall()
        return _listing(rows)

    def revoke_ui_user(self, user: str, now: float) -> int:
        """Revoke a user's tokens (as :meth:`Store.revoke_ui_user`), and tell the others."""
        with self._use(write=True) as conn:
            conn.execute("DELETE FROM ui_tokens WHERE expires_at <= %s", (now,))
            (waiting,) = conn.execute(
                f"SELECT count(*) FROM ui_tokens WHERE user_name = %s AND {_WAITING}",
                (user,),
            ).fetchone()
            conn.execute(
                "UPDATE ui_tokens SET revoked_at = %s WHERE user_name = %s "
                "AND revoked_at IS NULL",
                (now, user),
            )
            self._changed(conn, user, "ui")
            with self._mirror:
                self.refresh_ui(conn, [user])
        return waiting

    def ui_token_revoked(self, user: str, token_hash: str) -> bool:
        """:return: whether the user's token (a hash) was revoked: from memory"""
        return token_hash in self._ui_revoked.get(user, ())
