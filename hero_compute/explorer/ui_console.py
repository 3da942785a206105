"""
The console and the event stream through the dashboard (CONTRACT §11): ``GET
/v1/nodes/<node_id>/vms/<vm_id>/console`` (operators) and ``GET /v1/events`` (every
session) with a WebSocket upgrade on the dashboard's own origin, joined to the
explorer's console relay (CONTRACT §8) and event stream (§10) on its own Unix socket.

The dashboard does not speak WebSocket itself: once the session, its role and the
``Origin`` are checked here, the browser's connection is taken from ``twisted.web`` and
spliced, byte for byte, to a fresh connection to the explorer's Unix socket carrying the
same upgrade request (without the cookie).  So the relay, its limits and its statuses
are the explorer's one implementation.  Only a ``101`` answer opens the splice; any
other answer is passed on as its status alone and both connections are closed, so that
the browser's connection never becomes a connection to the Unix socket's other methods.
Backpressure: each side's transport produces for the other's (a reader that does not
read stops the other from being read); an event reader's is capped as the explorer's
own are, and it is cut once the explorer has given up on it (:class:`~.ui_watch.Watched`).
Each splice is held by its session
(:meth:`~.ui_accounts.UiAccounts.hold`): when the session ends (revoked, expired), both
connections are cut at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import protocol
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.http import FORBIDDEN, NOT_ALLOWED, UNAUTHORIZED
from twisted.web.server import NOT_DONE_YET

from hero_compute.rpc.authz import UI_OPERATOR

from .dashboard_guard import same_origin
from .dashboard_login import WS_PROTOCOL, csrf_ws_ok
from .events import cap_send_buffer
from .ui_watch import Watched

if TYPE_CHECKING:
    from twisted.web.server import Request

    from .ui_users import Session


log = Logger()

#: The console's path, as on every explorer listener.
PATH = re.compile(
    rb"^/v1/nodes/(?P<node_id>[A-Za-z0-9._-]{1,64})"
    rb"/vms/(?P<vm_id>[A-Za-z0-9_.-]{1,64})/console/?$"
)

#: The event stream's path (CONTRACT §10), for every session.
EVENTS = re.compile(rb"^/v1/events/?$")

#: The request headers passed on to the explorer: the WebSocket handshake's own.
PASSED = (b"upgrade", b"connection", b"sec-websocket-key", b"sec-websocket-version")

#: Bytes of the explorer's answer head read before giving up on it, and bytes the
#: browser may send before the splice is open (it should send none).
MAX_HEAD = 16 * 1024

#: Seconds allowed for the explorer's answer to the upgrade.
ANSWER_TIMEOUT = 30.0

_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    409: b"Conflict",
    429: b"Too Many Requests",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
}


def status_only(status: int) -> bytes:
    """:return: an HTTP/1.1 answer of ``status`` with no body, closing the connection"""
    reason = _REASONS.get(status, b"Error")
    return b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % (
        status,
        reason,
    )


def upgrade_head(request: Request, path: bytes) -> bytes:
    """
    :param request: the browser's ``twisted.web`` request
    :param path: its path (bytes)
    :return: the upgrade request to send on to the explorer (bytes)
    """
    lines = [b"GET %s HTTP/1.1" % path, b"Host: localhost"]
    for name in PASSED:
        value = request.getHeader(name)
        if value is not None and b"\r" not in value and b"\n" not in value:
            lines.append(b"%s: %s" % (name, value))
    return b"\r\n".join(lines) + b"\r\n\r\n"


class _Browser(protocol.Protocol):
    """The browser's connection, once taken from ``twisted.web``."""

    transport: Any

    def __init__(self, channel) -> None:
        self._channel = channel
        self.explorer: Any = None
        self._early = b""
        self.gone = False
        #: Called once the connection has closed (lets go of the session's hold).
        self.release: Callable[[], None] = lambda: None
        #: Whether it reads the event stream (watched: :class:`~.ui_watch.Watched`).
        self.events = False

    def abort(self) -> None:
        """The session has ended: cut both connections, nothing more relayed."""
        if self.explorer is not None and self.explorer.transport is not None:
            self.explorer.transport.abortConnection()
        if self.transport is not None and not self.gone:
            self.transport.abortConnection()
        # Its loss is reported a turn later: nothing may be joined to it meanwhile.
        self.gone = True

    def dataReceived(self, data) -> None:
        if self.explorer is not None and self.explorer.open:
            self.explorer.transport.write(data)
            return
        self._early += data
        if len(self._early) > MAX_HEAD:
            self.transport.abortConnection()

    def flush(self) -> None:
        """The splice is open: what the browser sent early goes on."""
        early, self._early = self._early, b""
        if early:
            self.explorer.transport.write(early)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.gone = True
        self.release()
        if self.explorer is not None and self.explorer.transport is not None:
            self.explorer.transport.loseConnection()
        # The channel's own end: its admission is released, its request finished.
        self._channel.connectionLost(reason)


class _Explorer(protocol.Protocol):
    """Our connection to the explorer's Unix socket."""

    transport: Any
    open = False

    def __init__(self, browser, head, clock, outcome) -> None:
        self._browser = browser
        self._head = head
        self._clock = clock
        self._outcome = outcome
        self._answer = b""
        self._timer = None

    def connectionMade(self) -> None:
        self._browser.explorer = self
        if self._browser.gone:
            # Closed (or cut: its session ended) while we connected.
            self.transport.abortConnection()
            return
        self.transport.write(self._head)
        self._timer = self._clock.callLater(ANSWER_TIMEOUT, self._refuse, 502)

    def dataReceived(self, data) -> None:
        if self.open:
            self._browser.transport.write(data)
            return
        self._answer += data
        end = self._answer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._answer) > MAX_HEAD:
                self._refuse(502)
            return
        status_line = self._answer.split(b"\r\n", 1)[0].split(b" ")
        status = (
            int(status_line[1])
            if len(status_line) > 1 and status_line[1].isdigit()
            else 502
        )
        if status != 101:
            self._refuse(status if status in _REASONS else 502)
            return
        self._settle(101)
        self._stop_timer()
        self.open = True
        # The subprotocol the page asked for (beside its key), or its browser fails it.
        self._answer = (
            self._answer[:end]
            + b"\r\nSec-WebSocket-Protocol: "
            + WS_PROTOCOL
            + self._answer[end:]
        )
        browser = self._browser.transport
        # Each side stops being read while the other cannot take what it sends.
        producer = self.transport
        if self._browser.events:
            producer = Watched(self.transport, browser, self._clock)
        browser.registerProducer(producer, True)
        self.transport.registerProducer(browser, True)
        browser.write(self._answer)
        self._answer = b""
        self._browser.flush()

    def _settle(self, status) -> None:
        outcome, self._outcome = self._outcome, None
        if outcome is not None:
            outcome(status)

    def _refuse(self, status) -> None:
        self._settle(status)
        self._stop_timer()
        if not self.open:
            self._browser.transport.write(status_only(status))
        self._browser.transport.loseConnection()
        self.transport.loseConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self._stop_timer()
        self._settle(502)
        if not self.open and self._browser.transport is not None:
            self._browser.transport.write(status_only(502))
        if self._browser.transport is not None:
            self._browser.transport.loseConnection()


def take_over(request: Request) -> _Browser:
    """
    Take the browser's connection from ``twisted.web``, as autobahn's WebSocket resource
    does: the channel lets go of the transport and a :class:`_Browser` gets its bytes.

    :return: the :class:`_Browser`
    """
    channel = request.channel
    channel.setTimeout(None)
    # A TCP or TLS transport, a producer too: twisted.web's channel types it as less.
    transport: Any = channel.transport
    transport.unregisterProducer()
    browser = _Browser(channel)
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = browser
    else:
        transport.protocol = browser
    browser.makeConnection(transport)
    # twisted.web stops reading a connection while it answers a request: read on.
    transport.resumeProducing()
    return browser


def splice(
    request: Request,
    path: bytes,
    socket_path: str,
    reactor: Any,
    outcome: Callable[[int], object] | None = None,
    hold: Callable[[Callable[[], None]], Callable[[], None]] | None = None,
    events: bool = False,
) -> int:
    """
    Join the browser's upgrade request to the explorer's console relay.

    :param request: the browser's request, already allowed (session, role, Origin)
    :param path: its path (bytes), matching :data:`PATH`
    :param socket_path: the explorer's Unix socket
    :param reactor: the reactor to connect with
    :param outcome: called once with the explorer's status (101: joined), or None
    :param hold: ``hold(abort)`` -> ``release``: ties the splice to its session
        (``abort()`` once the session ends), or None
    :param events: whether it is the event stream (:data:`EVENTS`)
    :return: :data:`NOT_DONE_YET`
    """
    head = upgrade_head(request, path)
    browser = take_over(request)
    if events:
        # A browser taking nothing fills it, the explorer's is then not read and closes
        # with 1008; uncapped, the kernel would take the whole replay for it unseen.
        cap_send_buffer(browser.transport)
        browser.events = True
    if hold is not None:
        browser.release = hold(browser.abort)
        if browser.gone:
            return NOT_DONE_YET
    endpoint = UNIXClientEndpoint(reactor, socket_path, timeout=5)
    d = endpoint.connect(
        protocol.Factory.forProtocol(lambda: _Explorer(browser, head, reactor, outcome))
    )

    def failed(failure) -> None:
        if outcome is not None:
            outcome(503)
        log.warn("dashboard console: the explorer's socket: {e}", e=failure.value)
        if browser.transport is not None:
            browser.transport.write(status_only(503))
            browser.transport.loseConnection()

    d.addErrback(failed)
    return NOT_DONE_YET


def _refuse(request, code, text):
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return text.encode() + b"\n"


def serve(
    request: Request,
    session: Session | None,
    console_socket: Callable[[], str | None] | None,
    reactor: Any,
    audit: Callable[[str, str, str | None, str], None] | None = None,
    hold: Callable[[Session, Callable[[], None]], Callable[[], None]] | None = None,
) -> bytes | int:
    """
    ``GET /v1/nodes/<node_id>/vms/<vm_id>/console`` or ``GET /v1/events`` on the
    dashboard: checked, then
    :func:`splice` d.

    :param request: the browser's request (its ``Host`` already allowed)
    :param session: its :class:`~hero_compute.explorer.ui_users.Session`, or None
    :param console_socket: a callable answering the explorer's Unix socket path (None
        while it has none), or None
    :param reactor: the reactor to connect with
    :param audit: ``audit(caller, method, target, outcome)`` for console attaches (the
        explorer records its own, as a Unix caller), or None
    :param hold: ``hold(session, abort)`` -> ``release``
        (:meth:`~.ui_accounts.UiAccounts.hold`): the splice ends with its session
    """
    if request.method != b"GET":
        request.setHeader(b"allow", b"GET")
        return _refuse(request, NOT_ALLOWED, "only GET is allowed here")
    if not session:
        return _refuse(request, UNAUTHORIZED, "no session")
    live = session

    def held(abort: Callable[[], None]) -> Callable[[], None]:
        return (lambda: None) if hold is None else hold(live, abort)

    if not same_origin(request):
        # A WebSocket is not held to the same-origin policy: its Origin must be ours.
        return _refuse(request, FORBIDDEN, "cross-origin (or Origin-less) console")
    if not csrf_ws_ok(session, request):
        # The cookie reaches every port of the host; the key only the page.
        return _refuse(request, FORBIDDEN, "no or wrong key in Sec-WebSocket-Protocol")
    match = PATH.match(request.path)
    if match is None:
        if EVENTS.match(request.path) is None:
            return _refuse(request, 404, "not found")
        return _events(request, console_socket, reactor, held)
    if session.user.role != UI_OPERATOR:
        return _refuse(request, FORBIDDEN, "the console is for operators")
    if (request.getHeader(b"upgrade") or b"").lower() != b"websocket":
        return _refuse(request, 400, "a WebSocket upgrade is expected here")
    socket_path = console_socket() if console_socket is not None else None
    if socket_path is None:
        return _refuse(request, 503, "no console relay on this explorer")
    log.info(
        "dashboard console: {user} attaches to VM {vm} on node {node}",
        user=session.user.name,
        vm=match["vm_id"].decode(),
        node=match["node_id"].decode(),
    )
    target = f"{match['node_id'].decode()}/{match['vm_id'].decode()}"

    def outcome(status) -> None:
        if audit is not None:
            verdict = "ok" if status == 101 else f"refused {status}"
            audit(session.user.uri, "console.attach", target, verdict)

    return splice(request, request.path, socket_path, reactor, outcome, held)


def _events(request, console_socket, reactor, held):
    """``GET /v1/events[?since=N]``: the explorer's event stream, for every session."""
    if (request.getHeader(b"upgrade") or b"").lower() != b"websocket":
        return _refuse(request, 400, "a WebSocket upgrade is expected here")
    since = (request.args or {}).get(b"since")
    target = b"/v1/events"
    if since:
        if not since[0].isdigit() or len(since[0]) > 20:
            return _refuse(request, 400, "since: a sequence number")
        target += b"?since=" + since[0]
    socket_path = console_socket() if console_socket is not None else None
    if socket_path is None:
        return _refuse(request, 503, "no event stream on this explorer")
    return splice(request, target, socket_path, reactor, hold=held, events=True)
