"""
WebSocket (RFC 6455) on top of our HTTP protocol, server and client, for the console
(CONTRACT §8).

``wsproto`` does the protocol without doing I/O (as in uvicorn's ``wsproto_impl``): we
hand it bytes and write what it gives back.  That fits our own httptools protocol, which
parses the upgrade request and then hands the connection over (:class:`Routes`, set as
:attr:`~hero_compute.rpc.http_server.RpcHTTPFactory.upgrade`), and Twisted client
protocols alike; ``autobahn`` would bring its own HTTP server and framework, and
``websockets`` its own asyncio I/O.

One connection is one :class:`WebSocket`; what it carries is a :class:`Handler`'s
business.  Backpressure is explicit: a peer that does not read is dropped once
``max_unsent`` bytes wait for it (never the one producing them), and a handler may stop
reading its peer while what the peer sends cannot be passed on.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError
from zope.interface import implementer

from .dispatch import CallContext
from .errors import RefusedByPolicy
from .sendnow import send_now

log = Logger()

#: Close codes (RFC 6455 §7.4.1).
NORMAL, GOING_AWAY, POLICY_VIOLATION = 1000, 1001, 1008

#: Bytes a client may send before its upgrade is answered (it should send none).
MAX_EARLY = 64 * 1024

#: Bytes of a refusal's body we keep on the client side, for the message.
MAX_REFUSAL_BODY = 4096

#: Seconds a connection we close may take to go (the peer reading what we sent last,
#: and answering TLS's close alert) before it is cut off: RFC 6455 §7.1.1 has the
#: server close TCP after the closing handshake and a client wait a bounded time.
CLOSE_TIMEOUT = 5.0


class HTTPRefusal(Exception):
    """
    An upgrade refused with an HTTP status (a route's ``accept`` raises it; the client
    fails with it).

    :ivar status: the HTTP status, e.g. 404 or 429
    :ivar message: a line for the peer
    """

    def __init__(self, status: int, message: str) -> None:
        Exception.__init__(self, status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}"


class Handler(Protocol):
    """What one WebSocket carries: called by its :class:`WebSocket`."""

    def opened(self, socket: WebSocket) -> None:
        """The handshake is done: ``socket`` may send from now on."""

    def received(self, data: bytes) -> None:
        """Part of a message arrived (text arrives UTF-8 encoded)."""

    def closed(self, code: int | None) -> None:
        """The connection is gone (``code``: the peer's close code, if it sent one)."""


@attrs.frozen
class UpgradeRequest:
    """
    An upgrade request matched to a route.

    :ivar route: the route's name, e.g. ``"console"``, for the roles table
    :ivar params: the route's named groups, e.g. ``{"vm_id": ...}``
    :ivar context: who asks, as for a JSON-RPC call
    """

    route: str
    params: Mapping[str, str]
    context: CallContext


#: ``accept(request)``: a :class:`Handler` (or a Deferred of one); raises (or fails
#: with) :class:`HTTPRefusal` to refuse.
Accept = Callable[[UpgradeRequest], Any]

#: ``authorize(context, route, params)``: raises
#: :class:`~hero_compute.rpc.errors.RefusedByPolicy` (see ``Policy.check_route``).
Authorize = Callable[[CallContext, str, Mapping[str, str]], None]


@attrs.frozen
class Route:
    """
    :ivar name: the route's name in the roles table
    :ivar pattern: a full-match regular expression of the path, with named groups
    :ivar accept: see :data:`Accept`
    """

    name: str
    pattern: re.Pattern[str]
    accept: Accept


@implementer(IPushProducer)
class WebSocket:
    """
    One WebSocket connection, either side, over a transport we write to.

    :param transport: the connection's transport
    :param connection: the ``wsproto`` connection
    :param max_unsent: bytes waiting for the peer beyond which it is dropped
    :param clock: an ``IReactorTime``, for the bound on a close (:data:`CLOSE_TIMEOUT`)
    """

    def __init__(
        self, transport: Any, connection: WSConnection, max_unsent: int, clock: Any
    ) -> None:
        self.transport = transport
        self._ws = connection
        self._max_unsent = max_unsent
        self._clock = clock
        self._closer: IDelayedCall | None = None
        self.handler: Handler | None = None
        #: Bytes counted as unsent since the transport said its buffer is full.
        self._unsent: int | None = None
        self._open = False
        self._gone = False
        self._code: int | None = None
        #: Whether it was dropped for not reading (for logs and tests).
        self.dropped = False
        #: Called with False when the peer stops taking what we write (the transport's
        #: buffer is full) and True when it has drained: a relay then stops reading
        #: the other side instead of growing this one's buffer to the drop.
        self.writable: Callable[[bool], None] | None = None

    def _started(self, handler: Handler) -> None:
        self.handler = handler
        self._open = True
        handler.opened(self)

    def send(self, data: bytes) -> None:
        """Send ``data`` as a binary message; a peer that does not read is dropped."""
        if self._open and not self._gone:
            self._write(self._ws.send(BytesMessage(data=data)))

    def send_text(self, text: str) -> None:
        """Send ``text`` as a text message (the event stream's JSON); likewise."""
        if self._open and not self._gone:
            self._write(self._ws.send(TextMessage(data=text)))

    def close(self, code: int = NORMAL, reason: str = "") -> None:
        """Start the closing handshake; the transport closes once the peer answers."""
        if self._open and not self._gone:
            self._open = False
            self._write(self._ws.send(CloseConnection(code=code, reason=reason)))
            self._hang_up()

    def pause_reading(self) -> None:
        """Read nothing more from the peer until :meth:`resume_reading`."""
        if not self._gone:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        """Read the peer again."""
        if not self._gone:
            self.transport.resumeProducing()

    def _write(self, data: bytes) -> None:
        if not data or self._gone:
            return
        # At once, not at the reactor's next turn: a console relays keystrokes, and
        # each hop's turn would add to the echo's round trip.
        send_now(self.transport, data)
        if self._unsent is not None:
            self._unsent += len(data)
            if self._unsent > self._max_unsent:
                # The peer does not read: it goes, not whoever feeds it.
                self.dropped = True
                log.info(
                    "dropping a WebSocket peer that does not read ({unsent} bytes unsent)",
                    unsent=self._unsent,
                )
                self._gone = True
                self.transport.abortConnection()

    # -- IPushProducer: the transport's verdict on what we wrote

    def pauseProducing(self) -> None:
        if self._unsent is None:
            self._unsent = getattr(self.transport, "bufferSize", 0)
            if self.writable is not None:
                self.writable(False)

    def resumeProducing(self) -> None:
        self._unsent = None
        if self.writable is not None and not self._gone:
            self.writable(True)

    def stopProducing(self) -> None:
        pass

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the peer."""
        if self._gone:
            return
        try:
            self._ws.receive_data(data)
            for event in self._ws.events():
                self._event(event)
        except RemoteProtocolError as e:
            log.info("WebSocket protocol error from the peer: {e}", e=e)
            self._gone = True
            self.transport.abortConnection()

    def _event(self, event: Event) -> None:
        if isinstance(event, BytesMessage) and self.handler is not None:
            self.handler.received(bytes(event.data))
        elif isinstance(event, TextMessage) and self.handler is not None:
            self.handler.received(event.data.encode("utf-8"))
        elif isinstance(event, Ping):
            self._write(self._ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            self._code = event.code
            if self._open:
                self._open = False
                self._write(self._ws.send(event.response()))
            self._hang_up()
        else:
            self._other(event)

    def _other(self, event: Event) -> None:
        """Handshake events, for the side that expects them."""

    def _hang_up(self) -> None:
        """Close the transport once what was written has gone, within CLOSE_TIMEOUT."""
        # The transport holds a producer (the HTTP protocol on a server, us on a
        # client), and a transport with one defers its close until it is unregistered:
        # TLS for ever (not even its close alert goes out), TCP while it is paused.
        # Both ends then keep the connection, a descriptor each, until the process
        # stops: nothing of ours produces for it any more.
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        if self._closer is None:
            # A peer that does not read, or never answers TLS's close alert, would
            # keep it open all the same.
            self._closer = self._clock.callLater(CLOSE_TIMEOUT, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._closer = None
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        """The transport is gone: tell the handler once."""
        if self._closer is not None:
            if self._closer.active():
                self._closer.cancel()
            self._closer = None
        self._gone = True
        self._open = False
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.closed(self._code)


class _ServerSocket(WebSocket):
    """The server side: waits for the route's verdict, then answers the upgrade."""

    _early = b""
    _pending: defer.Deferred[Handler] | None = None

    def answer(self, verdict: Handler | defer.Deferred[Handler]) -> None:
        d: defer.Deferred[Handler] = (
            verdict if isinstance(verdict, defer.Deferred) else defer.succeed(verdict)
        )
        self._pending = d
        d.addCallbacks(self._accepted, self._refused)

    def _accepted(self, handler: Handler) -> None:
        self._pending = None
        if self._gone:
            handler.closed(None)
            return
        self.transport.write(self._ws.send(AcceptConnection()))
        self._started(handler)
        early, self._early = self._early, b""
        if early:
            self.dataReceived(early)

    def _refused(self, failure: Failure) -> None:
        self._pending = None
        if failure.check(defer.CancelledError) or self._gone:
            return
        if isinstance(failure.value, HTTPRefusal):
            status, message = failure.value.status, failure.value.message
        else:
            log.failure("accepting a WebSocket failed", failure)
            status, message = 500, "internal error"
        self.refuse(status, message)

    def refuse(self, status: int, message: str) -> None:
        """Answer the upgrade with an HTTP error and close."""
        body = (message + "\n").encode("utf-8")
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
        ]
        self.transport.write(
            self._ws.send(RejectConnection(status, headers, has_body=True))
            + self._ws.send(RejectData(body))
        )
        self._gone = True
        self._hang_up()

    def dataReceived(self, data: bytes) -> None:
        if self.handler is None and not self._gone:
            self._early += data
            if len(self._early) > MAX_EARLY:
                self._gone = True
                self.transport.abortConnection()
            return
        WebSocket.dataReceived(self, data)

    def connectionLost(self, reason: Failure) -> None:
        if self._pending is not None:
            self._pending.cancel()
        WebSocket.connectionLost(self, reason)


class Routes:
    """
    The WebSocket routes of a server: the HTTP protocol's upgrade hook.

    :param routes: the :class:`Route` s
    :param authorize: see :data:`Authorize`
    :param max_unsent: bytes waiting for a peer beyond which it is dropped
    :param clock: an ``IReactorTime`` (the reactor if None)
    """

    def __init__(
        self,
        routes: Sequence[Route],
        authorize: Authorize,
        max_unsent: int,
        clock: Any = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._routes = list(routes)
        self._authorize = authorize
        self.max_unsent = max_unsent
        self._clock = clock

    def __call__(self, transport: Any, head: bytes, context: CallContext) -> WebSocket:
        """
        Take over a connection whose request (``head``, every byte of it) asks for an
        upgrade.

        :return: the :class:`WebSocket` that the HTTP protocol now passes bytes to
        """
        ws = WSConnection(ConnectionType.SERVER)
        socket = _ServerSocket(transport, ws, self.max_unsent, self._clock)
        try:
            ws.receive_data(head)
            request = next(e for e in ws.events() if isinstance(e, Request))
        except (RemoteProtocolError, StopIteration) as e:
            hint = getattr(e, "event_hint", None)
            status = hint.status_code if isinstance(hint, RejectConnection) else 400
            socket.refuse(status, f"not a WebSocket upgrade: {e}")
            return socket
        path = request.target.split("?", 1)[0]
        for route in self._routes:
            match = route.pattern.fullmatch(path)
            if match is not None:
                break
        else:
            socket.refuse(404, "no such resource")
            return socket
        # The query's parameters too (``/v1/events?since=N``); the path's win.
        query = urllib.parse.parse_qsl(request.target.partition("?")[2])
        params = {**dict(query), **match.groupdict()}
        try:
            self._authorize(context, route.name, params)
        except RefusedByPolicy as e:
            socket.refuse(403, str(e))
            return socket
        try:
            verdict = route.accept(UpgradeRequest(route.name, params, context))
        except HTTPRefusal as e:
            socket.refuse(e.status, e.message)
            return socket
        socket.answer(verdict)
        return socket
