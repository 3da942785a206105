"""
The dashboard's accounts (CONTRACT §11): login tokens for named users with a role, and
the sessions they are traded for.

``hero-compute ui token create --user NAME --role viewer|operator`` calls
``explorer.ui_token_create`` (Unix socket or client certificate) and prints a login URL;
the token in it is kept only as its SHA-256, in the explorer's store
(:mod:`.store.ui_tokens`: the state file, or the PostgreSQL database every explorer of
it shares), and is spent by its first use, at any explorer of the store, for a session
cookie.  SHA-256 without salt or stretching is enough: a token is 256 random bits,
nothing a dictionary or a brute force could find.  Each session carries its own CSRF
token, handed to the page once at login (:mod:`.dashboard_login`) and required back on
every ``POST /rpc`` and WebSocket.  Revoking a user ends its tokens and its live sessions
at once, here, and at the other explorers of a shared store as soon as they read the
change (their sessions check the store's mirror of revoked tokens on every request).

A session's open WebSockets (the console, the event stream) are held by session
(:meth:`UiAccounts.hold`, :mod:`.ui_live`) and cut the moment it ends.

Sessions are bounded per user (:data:`MAX_USER_SESSIONS`, the oldest of the same user
let go past it) and in all (:data:`MAX_SESSIONS`, new logins refused past it): one
user's logins, the start-up token's above all, never end another user's session.

Sessions are this explorer's, in memory: a restart logs its browsers out (the login
token is spent; an operator makes a new one).  Store calls run where the explorer runs
them (:meth:`~.trust.ExplorerTrust.run_on_store`): at once for SQLite, on the store's
thread for PostgreSQL, whose answers are then Deferreds; with the database down they
are -32007, and a login is refused with 503 (its token is not spent).

The explorer's start-up token makes viewer sessions; a ``client/*`` certificate on the
TLS dashboard is an operator (its CSRF token is derived from its name, since it has no
cookie session).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from hero_compute.rpc.authz import UI_OPERATOR
from hero_compute.rpc.errors import InvalidParams, StoreUnavailable

from .ui_live import LiveSockets
from .ui_users import (
    RESERVED_USERS,
    ROLES,
    USER,
    DashboardUser,
    Session,
    SessionsFull,
    role_name,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from hero_compute.rpc.dispatch import Dispatcher

    from .store import IStore


log = Logger()

#: A login token's life unless asked otherwise (seconds), and the longest one.
DEFAULT_TTL = 8 * 3600
MAX_TTL = 30 * 86400

#: Sessions kept at once; past it (once the expired ones are gone) a login is refused.
MAX_SESSIONS = 10_000

#: Sessions kept at once per user; the user's own oldest is let go past it (whoever
#: holds the start-up token could mint them without end).
MAX_USER_SESSIONS = 100

#: Login tokens waiting to be used, at most (each is a few bytes).
MAX_TOKENS = 10_000


def _hash(token):
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class UiAccounts:
    """
    The dashboard's login tokens and sessions, and the ``explorer.ui_token_*`` methods.

    :param clock: an ``IReactorTime`` (Unix seconds)
    :param store: ``store()`` -> the open :class:`~hero_compute.explorer.store.IStore`
        holding the login tokens, or None (then login tokens are -32007)
    :param run: ``run(f, *args)``: call ``f`` where store calls run (at once, or on the
        store's thread, answering a Deferred)
    :param limit: sessions kept at once
    :param per_user: sessions kept at once per user
    """

    def __init__(
        self,
        clock: IReactorTime,
        store: Callable[[], IStore | None] | None = None,
        run: Callable[..., Any] | None = None,
        limit: int = MAX_SESSIONS,
        per_user: int = MAX_USER_SESSIONS,
    ) -> None:
        self._clock = clock
        self._store = store or (lambda: None)
        self._run = run or (lambda f, *args: f(*args))
        self._limit = limit
        self._per_user = per_user
        # session id -> Session, oldest first
        self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        # user name -> its session ids, oldest first
        self._by_user: dict[str, collections.OrderedDict[str, None]] = {}
        self._live = LiveSockets(clock, self._gone, self._end)
        self._cert_key = secrets.token_bytes(32)
        #: Answers the dashboard's URL (``http(s)://host:port``) once it listens, or
        #: None, for the login URLs.
        self.url_of: Callable[[], str | None] = lambda: None

    def register(self, rpc: Dispatcher) -> None:
        """Publish ``explorer.ui_token_*`` on a dispatcher."""
        rpc.register("explorer.ui_token_create", self.create)
        rpc.register("explorer.ui_token_list", self.list)
        rpc.register("explorer.ui_token_revoke", self.revoke)

    # -- login tokens

    def _on_store(self, name, *args):
        store = self._store()
        if store is None:
            raise StoreUnavailable()
        return self._run(getattr(store, name), *args)

    def create(self, user: str, role: str, ttl: float = DEFAULT_TTL) -> Any:
        """
        A single-use login token for ``user``, kept in the store as its hash.

        :return: ``{"user", "role", "expires_at", "token", "url"}`` (``url`` None when
            the explorer runs no dashboard), or a Deferred of it
        """
        if not isinstance(user, str) or not USER.match(user):
            raise InvalidParams(
                "user: 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a "
                "letter or digit"
            )
        if user in RESERVED_USERS:
            # The audit would not tell this user's writes from the built-in caller's.
            raise InvalidParams(f"user: {user!r} is reserved for the start-up token")
        if role not in ROLES:
            raise InvalidParams("role: 'viewer' or 'operator'")
        if not isinstance(ttl, int | float) or isinstance(ttl, bool):
            raise InvalidParams("ttl: seconds, a number")
        if not 1 <= ttl <= MAX_TTL:
            raise InvalidParams(f"ttl: from 1 to {MAX_TTL} seconds")
        now = self._clock.seconds()
        token = secrets.token_urlsafe(32)
        expires_at = now + ttl
        kept = self._on_store(
            "add_ui_token", _hash(token), user, role, now, expires_at, MAX_TOKENS
        )
        return _then(kept, lambda ok: self._made(ok, user, role, ttl, expires_at, token))

    def _made(self, kept, user, role, ttl, expires_at, token):
        if not kept:
            raise InvalidParams(
                f"{MAX_TOKENS} login tokens wait to be used: revoke some first"
            )
        log.info(
            "dashboard login token made for {user} ({role}), valid {ttl:.0f} s",
            user=user,
            role=role,
            ttl=ttl,
        )
        base = self.url_of()
        url = None if base is None else f"{base}/?token={token}"
        return {
            "user": user,
            "role": role,
            "expires_at": expires_at,
            "token": token,
            "url": url,
        }

    def list(self) -> Any:
        """
        :return: ``{"tokens": [{user, role, created_at, expires_at}], "sessions":
            [{user, role, expires_at}]}``: the unused tokens of the store, this
            explorer's live sessions; never a token or a session id (or a Deferred)
        """
        now = self._clock.seconds()
        return _then(self._on_store("ui_tokens", now), self._listing)

    def _listing(self, rows):
        tokens = [
            {k: t[k] for k in ("user", "role", "created_at", "expires_at")}
            for t in rows
            if not t["used"] and not t["revoked"]
        ]
        sessions = [
            {
                "user": s.user.name,
                "role": role_name(s.user.role),
                "expires_at": s.expires_at,
            }
            for sid, s in list(self._sessions.items())
            if self.session(sid) is not None
        ]
        key = lambda e: (e["user"], e["expires_at"] or 0)  # noqa: E731
        return {"tokens": sorted(tokens, key=key), "sessions": sorted(sessions, key=key)}

    def revoke(self, user: str) -> Any:
        """
        End ``user``'s tokens (at every explorer of the store) and this explorer's live
        sessions of it; the other explorers end theirs when they read the change.

        :return: ``{"tokens": n, "sessions": n}``: unused tokens and sessions ended
            (or a Deferred of it)
        """
        if not isinstance(user, str) or not USER.match(user):
            raise InvalidParams("user: a dashboard user name")
        waiting = self._on_store("revoke_ui_user", user, self._clock.seconds())
        return _then(waiting, lambda n: self._revoked(user, n))

    def _revoked(self, user, tokens):
        sessions = list(self._by_user.get(user, ()))
        for sid in sessions:
            self._end(sid)
        log.info(
            "dashboard user {user} revoked: {tokens} tokens, {sessions} sessions ended",
            user=user,
            tokens=tokens,
            sessions=len(sessions),
        )
        return {"tokens": tokens, "sessions": len(sessions)}

    def redeem(self, token: str) -> Any:
        """
        Spend a login token, in the store.

        :param token: what the login URL carried (str)
        :raises StoreUnavailable: no store (a Deferred fails with it when the database
            is down)
        :return: a new :class:`Session` and its id, or None if the token is unknown,
            spent, revoked or expired (or a Deferred of that)
        """
        token_hash = _hash(token)
        found = self._on_store("redeem_ui_token", token_hash, self._clock.seconds())
        return _then(found, lambda row: self._login(row, token_hash))

    def _login(self, row, token_hash):
        if row is None or row[1] not in ROLES:
            return None
        user, role, expires_at = row
        log.info("dashboard login by {user} ({role})", user=user, role=role)
        return self.new_session(DashboardUser(ROLES[role], user), expires_at, token_hash)

    # -- sessions

    def new_session(
        self,
        user: DashboardUser,
        expires_at: float | None = None,
        token_hash: str | None = None,
    ) -> tuple[str, Session]:
        """
        :return: ``(session id, Session)`` for a :class:`DashboardUser`; past the
            user's bound its own oldest session ends (never another user's)
        :raises SessionsFull: :data:`MAX_SESSIONS` live sessions already
        """
        mine = self._by_user.setdefault(user.name, collections.OrderedDict())
        while len(mine) >= self._per_user:
            self._end(next(iter(mine)))
        # Ending the user's last session let go of its table: the new one goes in anew.
        mine = self._by_user.setdefault(user.name, mine)
        if len(self._sessions) >= self._limit:
            now = self._clock.seconds()
            for sid in [
                sid
                for sid, s in self._sessions.items()
                if s.expires_at is not None and s.expires_at <= now
            ]:
                self._end(sid)
            if len(self._sessions) >= self._limit:
                if not mine:
                    del self._by_user[user.name]
                raise SessionsFull()
        sid = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), expires_at, token_hash, sid)
        self._sessions[sid] = session
        mine[sid] = None
        return sid, session

    def _end(self, sid: str) -> None:
        """Forget a session and cut its open WebSockets."""
        session = self._sessions.pop(sid, None)
        if session is not None:
            mine = self._by_user.get(session.user.name)
            if mine is not None:
                mine.pop(sid, None)
                if not mine:
                    del self._by_user[session.user.name]
        self._live.cut(sid)

    def hold(self, session: Session, abort: Callable[[], None]) -> Callable[[], None]:
        """
        Tie an open WebSocket to its session (:class:`.ui_live.LiveSockets`):
        ``abort()`` is called at once when the session ends.

        :param session: the connection's :class:`Session` (a client certificate's,
            which no revocation here ends, is not held)
        :param abort: cuts the connection
        :return: ``release()``, to call once the connection has closed by itself
        """
        sid = session.sid
        if sid is None:
            return lambda: None
        if self._sessions.get(sid) is not session:
            # Ended between its check and now.
            abort()
            return lambda: None
        return self._live.hold(
            sid,
            session.expires_at,
            abort,
            sweep=session.token_hash is not None and self._store() is not None,
        )

    def _gone(self, sid: str) -> bool:
        session = self._sessions.get(sid)
        return session is None or self._revoked_elsewhere(session)

    def session(self, sid: bytes | str | None) -> Session | None:
        """
        :param sid: a session cookie's value (bytes or str), or None
        :return: its live :class:`Session`, or None
        """
        if not sid:
            return None
        if isinstance(sid, bytes):
            sid = sid.decode("ascii", "replace")
        session = self._sessions.get(sid)
        if session is None:
            return None
        if (
            session.expires_at is not None and session.expires_at <= self._clock.seconds()
        ) or self._revoked_elsewhere(session):
            self._end(sid)
            return None
        return session

    def _revoked_elsewhere(self, session):
        if session.token_hash is None:
            return False
        store = self._store()
        # From the store's mirror: no database call per request.
        return store is not None and store.ui_token_revoked(
            session.user.name, session.token_hash
        )

    def certificate_session(self, name: str) -> Session:
        """
        The session of a ``client/<name>`` certificate: an operator, with a CSRF token
        derived from its name (it has no cookie to hang one on).
        """
        user = DashboardUser(UI_OPERATOR, f"client/{name}")
        csrf = hmac.new(self._cert_key, user.name.encode(), hashlib.sha256).hexdigest()
        return Session(user, csrf)

    def __len__(self) -> int:
        return len(self._sessions)


def _then(result, after):
    """``after(result)``, at once or once ``result`` (a Deferred) has fired."""
    if isinstance(result, defer.Deferred):
        return result.addCallback(after)
    return after(result)
