"""
The dashboard's token exchange, ``GET /?token=...`` (CONTRACT §11): the explorer's
start-up token (a viewer) or a user's login token, spent in the store, for a session
cookie; then a redirect to ``/#k=<CSRF token>``, so the token leaves the address bar
and the history.  The session's CSRF token is handed out there only, once: the page keeps
it in ``sessionStorage`` and sends it in ``X-CSRF-Token`` on ``POST /rpc`` and in
``Sec-WebSocket-Protocol`` on its WebSockets.  So the cookie alone (which every port of
the host receives, RFC 6265 §8.5) gets the page's shell, never a call or a socket.  A
client certificate, which no other port receives, gets its token in the page.

A login token is looked up in the store, which for PostgreSQL is a call on the store's
thread: the answer waits for it, the reactor does not.  With the database down the
login is refused with 503, and the token is left unspent.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import server
from twisted.web.http import FOUND, INTERNAL_SERVER_ERROR, SERVICE_UNAVAILABLE, UNAUTHORIZED

from hero_compute.rpc.authz import UI_VIEWER
from hero_compute.rpc.errors import StoreUnavailable

from .ui_users import STARTUP_USER, DashboardUser, SessionsFull, role_name

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from .ui_accounts import UiAccounts
    from .ui_users import Session

log = Logger()

#: ``refuse(request, code, text)``: the body of a refusal, its code and type set.
Refuse = Callable[[server.Request, int, str], bytes]

#: The session cookie's name, followed by the listener's port: cookies are not
#: port-scoped (RFC 6265 §8.5), so two dashboards on one host keep theirs apart.
COOKIE = b"hero_ui_"


def cookie_name(request: server.Request) -> bytes:
    """:return: the session cookie's name on the listener ``request`` came to"""
    return COOKIE + str(request.getHost().port).encode()


#: What a browser reads when its login cannot be checked.
UNAVAILABLE = "the explorer's state store is unavailable: open the login URL again later"

#: What a browser reads when the explorer holds as many sessions as it keeps.
FULL = "the dashboard has as many sessions as it keeps: try again later"


def exchange(
    request: server.Request,
    accounts: UiAccounts,
    token: bytes,
    startup: bytes,
    cookie: bytes,
    refuse: Refuse,
) -> bytes | int:
    """
    Answer a ``GET /?token=...``.

    :param request: the ``twisted.web`` request
    :param accounts: the :class:`~hero_compute.explorer.ui_accounts.UiAccounts`
    :param token: the token the URL carried (bytes)
    :param startup: the explorer's start-up token (bytes)
    :param cookie: the session cookie's name (bytes)
    :param refuse: ``refuse(request, code, text)`` -> the body of a refusal
    :return: the body, or ``NOT_DONE_YET`` while the store is asked
    """
    try:
        if hmac.compare_digest(token, startup):
            login = accounts.new_session(DashboardUser(UI_VIEWER, STARTUP_USER))
            return _logged_in(request, login, cookie)
        # A user's login token: spent here, whatever follows.
        login = accounts.redeem(token.decode("utf-8", "replace"))
    except StoreUnavailable:
        return refuse(request, SERVICE_UNAVAILABLE, UNAVAILABLE)
    except SessionsFull:
        return refuse(request, SERVICE_UNAVAILABLE, FULL)
    if not isinstance(login, defer.Deferred):
        return _answer(request, login, cookie, refuse)
    gone: list[Failure] = []
    request.notifyFinish().addErrback(gone.append)

    def failed(failure: Failure) -> bytes:
        if failure.check(StoreUnavailable):
            return refuse(request, SERVICE_UNAVAILABLE, UNAVAILABLE)
        if failure.check(SessionsFull):
            return refuse(request, SERVICE_UNAVAILABLE, FULL)
        log.failure("dashboard login", failure)
        return refuse(request, INTERNAL_SERVER_ERROR, "the login could not be checked")

    def write(body: bytes) -> None:
        # The browser may have left meanwhile: its token is spent all the same.
        if not gone:
            request.write(body)
            request.finish()

    login.addCallbacks(lambda found: _answer(request, found, cookie, refuse), failed)
    login.addCallback(write)
    return server.NOT_DONE_YET


def _answer(
    request: server.Request,
    login: tuple[str, Session] | None,
    cookie: bytes,
    refuse: Refuse,
) -> bytes:
    if login is None:
        return refuse(request, UNAUTHORIZED, "wrong, used, revoked or expired token")
    return _logged_in(request, login, cookie)


def _logged_in(request: server.Request, login: tuple[str, Session], cookie: bytes) -> bytes:
    sid, session = login
    request.addCookie(
        cookie,
        sid.encode(),
        path=b"/",
        httpOnly=True,
        sameSite="strict",
        # Never sent over plain http:// to the same host (on any port).
        secure=request.isSecure(),
    )
    request.setResponseCode(FOUND)
    # In the fragment: never sent to a server, nor in a Referer.
    request.setHeader(b"location", b"/#k=" + session.csrf.encode())
    return b""


def csrf_ok(session: Session, request: server.Request) -> bool:
    """
    :param session: the request's :class:`Session`
    :param request: a ``twisted.web`` request
    :return: whether it carries the session's token in ``X-CSRF-Token``
    """
    sent = request.getHeader(b"x-csrf-token")
    if sent is None:
        return False
    return hmac.compare_digest(sent.strip(), session.csrf.encode())


#: The WebSocket subprotocol the page asks for, and the prefix of the one carrying the
#: CSRF token beside it (a browser's WebSocket can set no other header).
WS_PROTOCOL = b"hero-ui"
WS_KEY = b"k."


def csrf_ws_ok(session: Session, request: server.Request) -> bool:
    """
    :return: whether a WebSocket upgrade offers ``hero-ui`` and ``k.<the session's CSRF
        token>`` in ``Sec-WebSocket-Protocol``
    """
    offered = [
        p.strip()
        for value in request.requestHeaders.getRawHeaders(b"sec-websocket-protocol", [])
        for p in value.split(b",")
    ]
    keys = [p[len(WS_KEY) :] for p in offered if p.startswith(WS_KEY)]
    return (
        WS_PROTOCOL in offered
        and len(keys) == 1
        and hmac.compare_digest(keys[0], session.csrf.encode())
    )


def with_session(page: bytes, session: Session) -> bytes:
    """
    The page with the session's role written into its ``<meta>`` tags, and a client
    certificate's CSRF token (a cookie session's is handed out at login only).

    :param page: index.html (bytes) with empty ``csrf-token`` and ``ui-role`` metas
    :param session: the :class:`Session`
    :return: bytes
    """
    role = role_name(session.user.role)
    csrf = session.csrf.encode() if session.sid is None else b""
    return page.replace(
        b'<meta name="csrf-token" content="">',
        b'<meta name="csrf-token" content="%s">' % csrf,
        1,
    ).replace(
        b'<meta name="ui-role" content="viewer">',
        b'<meta name="ui-role" content="%s">' % role.encode(),
        1,
    )
