"""
WebSocket (RFC 6455) on top of our HTTP protocol, server and client, for the console
(CONTRACT §8).

``wsproto`` does the protocol without doing I/O (as in uvicorn's ``wsproto_impl``): we
hand it bytes and write what it gives back.  That fits our own httptools protocol, which
parses the upgrade request and then hands the connection over
(:class:`~.websocket_server.Routes`, set as
:attr:`~hero_compute.rpc.http_server.RpcHTTPFactory.upgrade`), and Twisted client
protocols alike; ``autobahn`` would bring its own HTTP server and framework, and
``websockets`` its own asyncio I/O.

One connection is one :class:`WebSocket`; what it carries is a :class:`Handler`'s
business.  Backpressure is explicit: a peer that does not read is dropped once
``max_unsent`` bytes wait for it (never the one producing them), and a handler may stop
reading its peer while what the peer sends cannot be passed on.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from wsproto import WSConnection
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError
from zope.interface import implementer

from .sendnow import send_now

log = Logger()

#: Close codes (RFC 6455 §7.4.1).
NORMAL, GOING_AWAY, POLICY_VIOLATION = 1000, 1001, 1008

#: Bytes of a refusal's body we keep on the client side, for the message.
MAX_REFUSAL_BODY = 4096

#: Seconds a connection we close may take to go (the peer reading what we sent last,
#: and answering TLS's close alert) before it is cut off: RFC 6455 §7.1.1 has the
#: server close TCP after the closing handshake and a client wait a bounded time.
CLOSE_TIMEOUT = 5.0


def text_frame(text: str) -> bytes:
    """
    A server's text message as one frame, ready to write with
    :meth:`WebSocket.send_frames`.

    A server's frames are not masked (RFC 6455 §5.1) and we negotiate no extension, so
    these bytes are the same for every peer: a message sent to many is encoded once.

    :param text: the message
    """
    payload = text.encode("utf-8")
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x81, 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 127, size)
    return head + payload


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

    def send_frames(self, frames: bytes) -> None:
        """
        Send whole frames made by :func:`text_frame` as they are (server side only: a
        client's frames are masked); likewise.
        """
        if self._open and not self._gone:
            self._write(frames)

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
