"""
The dashboard's accounts (CONTRACT §11): login tokens for named users with a role, and
the sessions they are traded for.

``hero-compute ui token create --user NAME --role viewer|operator`` calls
``explorer.ui_token_create`` (Unix socket or client certificate) and prints a login URL;
the token in it is kept only as its SHA-256, and is spent by its first use, for a
session cookie.  Each session carries its own CSRF token, written into the page and
required back in an ``X-CSRF-Token`` header on every ``POST /rpc``.  Revoking a user
ends its tokens and its live sessions at once.

The explorer's start-up token makes viewer sessions; a ``client/*`` certificate on the
TLS dashboard is an operator (its CSRF token is derived from its name, since it has no
cookie session).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import re
import secrets
from typing import TYPE_CHECKING, Any

import attrs
from twisted.logger import Logger

from hero_compute.rpc.authz import UI_OPERATOR, UI_VIEWER
from hero_compute.rpc.errors import InvalidParams

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.web.server import Request

    from hero_compute.rpc.dispatch import Dispatcher


log = Logger()

#: The roles a dashboard user may have, by their name on the command line.
ROLES = {"viewer": UI_VIEWER, "operator": UI_OPERATOR}

#: A login token's life unless asked otherwise (seconds), and the longest one.
DEFAULT_TTL = 8 * 3600
MAX_TTL = 30 * 86400

#: Sessions kept at once; the oldest is forgotten past it (whoever holds the start-up
#: token could mint them without end).
MAX_SESSIONS = 1000

#: Login tokens waiting to be used, at most (each is a few bytes).
MAX_TOKENS = 10_000

#: A user name: what an operator would type, and safe in a log line and the audit.
USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

#: The user name of sessions made with the explorer's start-up token.
STARTUP_USER = "startup-token"


def _hash(token):
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@attrs.frozen
class DashboardUser:
    """
    Who a dashboard call is made as: the identity its :class:`CallContext` carries.

    :ivar role: :data:`~hero_compute.rpc.authz.UI_VIEWER` or ``UI_OPERATOR``
    :ivar name: the user's name (or a client certificate's ``client/<name>``)
    """

    role: str
    name: str

    @property
    def uri(self) -> str:
        """Who this is in the audit log (CONTRACT §10: the dashboard user)."""
        return f"dashboard:{self.name}"


@attrs.frozen
class Session:
    """
    One login.

    :ivar user: the :class:`DashboardUser`
    :ivar csrf: the token the page must send back on writes
    :ivar expires_at: Unix seconds after which it is over, or None (start-up token)
    """

    user: DashboardUser
    csrf: str
    expires_at: float | None = None


@attrs.frozen
class _Token:
    user: str
    role: str
    expires_at: float


class UiAccounts:
    """
    The dashboard's login tokens and sessions, and the ``explorer.ui_token_*`` methods.

    :param clock: an ``IReactorTime`` (Unix seconds)
    :param limit: sessions kept at once
    """

    def __init__(self, clock: IReactorTime, limit: int = MAX_SESSIONS) -> None:
        self._clock = clock
        self._limit = limit
        self._tokens: dict[str, _Token] = {}  # sha256 hex -> _Token
        # session id -> Session, oldest first
        self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self._cert_key = secrets.token_bytes(32)
        #: Answers the dashboard's URL (``http(s)://host:port``) once it listens, or
        #: None, for the login URLs.
        self.url_of = lambda: None

    def register(self, rpc: Dispatcher) -> None:
        """Publish ``explorer.ui_token_*`` on a dispatcher."""
        rpc.register("explorer.ui_token_create", self.create)
        rpc.register("explorer.ui_token_list", self.list)
        rpc.register("explorer.ui_token_revoke", self.revoke)

    # -- login tokens

    def create(self, user: str, role: str, ttl: float = DEFAULT_TTL) -> dict[str, Any]:
        """
        A single-use login token for ``user``.

        :return: ``{"user", "role", "expires_at", "token", "url"}`` (``url`` None when
            the explorer runs no dashboard)
        """
        if not isinstance(user, str) or not USER.match(user):
            raise InvalidParams(
                "user: 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a "
                "letter or digit"
            )
        if role not in ROLES:
            raise InvalidParams("role: 'viewer' or 'operator'")
        if not isinstance(ttl, int | float) or isinstance(ttl, bool):
            raise InvalidParams("ttl: seconds, a number")
        if not 1 <= ttl <= MAX_TTL:
            raise InvalidParams(f"ttl: from 1 to {MAX_TTL} seconds")
        now = self._clock.seconds()
        self._drop_expired(now)
        if len(self._tokens) >= MAX_TOKENS:
            raise InvalidParams(
                f"{MAX_TOKENS} login tokens wait to be used: revoke some first"
            )
        token = secrets.token_urlsafe(32)
        expires_at = now + ttl
        self._tokens[_hash(token)] = _Token(user, role, expires_at)
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

    def list(self) -> dict[str, list[dict[str, Any]]]:
        """
        :return: ``{"tokens": [{user, role, expires_at}], "sessions": [{user, role,
            expires_at}]}``, never a token or a session id
        """
        now = self._clock.seconds()
        self._drop_expired(now)
        tokens = [
            {"user": t.user, "role": t.role, "expires_at": t.expires_at}
            for t in self._tokens.values()
        ]
        sessions = [
            {
                "user": s.user.name,
                "role": _role_name(s.user.role),
                "expires_at": s.expires_at,
            }
            for s in self._sessions.values()
        ]
        key = lambda e: (e["user"], e["expires_at"] or 0)  # noqa: E731
        return {"tokens": sorted(tokens, key=key), "sessions": sorted(sessions, key=key)}

    def revoke(self, user: str) -> dict[str, int]:
        """
        End ``user``'s unused tokens and live sessions.

        :return: ``{"tokens": n, "sessions": n}`` ended
        """
        if not isinstance(user, str) or not USER.match(user):
            raise InvalidParams("user: a dashboard user name")
        tokens = [h for h, t in self._tokens.items() if t.user == user]
        for h in tokens:
            del self._tokens[h]
        sessions = [sid for sid, s in self._sessions.items() if s.user.name == user]
        for sid in sessions:
            del self._sessions[sid]
        log.info(
            "dashboard user {user} revoked: {tokens} tokens, {sessions} sessions ended",
            user=user,
            tokens=len(tokens),
            sessions=len(sessions),
        )
        return {"tokens": len(tokens), "sessions": len(sessions)}

    def redeem(self, token: str) -> tuple[str, Session] | None:
        """
        Spend a login token.

        :param token: what the login URL carried (str)
        :return: a new :class:`Session` and its id, or None if the token is unknown,
            spent or expired
        """
        entry = self._tokens.pop(_hash(token), None)
        now = self._clock.seconds()
        if entry is None or entry.expires_at <= now:
            return None
        log.info("dashboard login by {user} ({role})", user=entry.user, role=entry.role)
        return self.new_session(
            DashboardUser(ROLES[entry.role], entry.user), entry.expires_at
        )

    def _drop_expired(self, now: float) -> None:
        for h in [h for h, t in self._tokens.items() if t.expires_at <= now]:
            del self._tokens[h]

    # -- sessions

    def new_session(
        self, user: DashboardUser, expires_at: float | None = None
    ) -> tuple[str, Session]:
        """:return: ``(session id, Session)`` for a :class:`DashboardUser`"""
        sid = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), expires_at)
        self._sessions[sid] = session
        while len(self._sessions) > self._limit:
            self._sessions.popitem(last=False)
        return sid, session

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
        if session.expires_at is not None and session.expires_at <= self._clock.seconds():
            del self._sessions[sid]
            return None
        return session

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


def _role_name(role: str) -> str:
    return next(k for k, v in ROLES.items() if v == role)


def csrf_ok(session: Session, request: Request) -> bool:
    """
    :param session: the request's :class:`Session`
    :param request: a ``twisted.web`` request
    :return: whether it carries the session's token in ``X-CSRF-Token``
    """
    sent = request.getHeader(b"x-csrf-token")
    if sent is None:
        return False
    return hmac.compare_digest(sent.strip(), session.csrf.encode())


def with_session(page: bytes, session: Session) -> bytes:
    """
    The page with the session's CSRF token and role written into its ``<meta>`` tags.

    :param page: index.html (bytes) with empty ``csrf-token`` and ``ui-role`` metas
    :param session: the :class:`Session`
    :return: bytes
    """
    role = _role_name(session.user.role)
    return page.replace(
        b'<meta name="csrf-token" content="">',
        b'<meta name="csrf-token" content="%s">' % session.csrf.encode(),
        1,
    ).replace(
        b'<meta name="ui-role" content="viewer">',
        b'<meta name="ui-role" content="%s">' % role.encode(),
        1,
    )
