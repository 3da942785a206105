"""
HTTP/1.1 as our JSON-RPC listeners put it on the wire: the sizes a request may have, the
record of one request, the bytes of our answers (status lines, ``Date`` header, the
head a request's connection wants), and the lingering close of a refusal.  The state
machine that uses them is :class:`~hero_compute.rpc.http_server.RpcHTTPProtocol`.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport

#: Request bodies above this many bytes are refused with 413 before being read.
MAX_BODY = 1024 * 1024

#: Limits on what precedes a body: generous for JSON-RPC, small enough that a peer
#: cannot make us buffer much.
MAX_URL = 8 * 1024
MAX_HEADERS = 64 * 1024

#: The status line of every status we send, reason phrase from :class:`http.HTTPStatus`.
#: Call sites name statuses by number: an ``HTTPStatus`` member costs a Python-level
#: ``__hash__`` per lookup, about a microsecond a request in all.
STATUS_LINES = {
    status: b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode("ascii"))
    for status in (200, 204, 400, 403, 404, 405, 408, 413, 414, 431, 500)
}

#: Request headers only browsers send: ``Origin`` (on every WebSocket handshake and
#: every ``POST``, same-origin ones included, so after a DNS rebinding too) and the
#: fetch metadata a browser sends with ``Sec-Fetch-Mode`` to secure origins (HTTPS and
#: localhost: ``-Site`` and ``-Dest``, ``-User`` on a navigation; over plain HTTP to
#: another address ``Origin`` alone speaks for the browser, which is enough for a
#: ``POST`` and a WebSocket).  A JSON-RPC listener is for programs; a request
#: carrying one of these is a web page's, refused with 403 before anything runs (a
#: "simple" cross-site ``POST`` is sent with no preflight, and a WebSocket is not held
#: to the same-origin policy).  ``Sec-Fetch-Mode`` alone is not a browser's: Node.js's
#: ``fetch`` (undici) sends it, and nothing else of these, on every request.  Browsers
#: reach the explorer through its dashboard, which has guards of its own.
BROWSER_HEADERS = frozenset(
    (b"origin", b"sec-fetch-site", b"sec-fetch-dest", b"sec-fetch-user")
)

#: The answer to a browser's request (see :data:`BROWSER_HEADERS`).
BROWSER_REFUSED = (
    b"a browser's request (Origin, Sec-Fetch-Site, -Dest or -User header) is refused: "
    b"this JSON-RPC listener is for programs; browsers use the explorer's dashboard\n"
)

#: The content type of our plain-text answers (refusals, 404, 405).
TEXT = b"text/plain; charset=utf-8"


class Refused(Exception):
    """Raised from a parser callback to stop reading a request we will not serve."""

    def __init__(self, status: int, message: bytes) -> None:
        Exception.__init__(self, status, message)
        self.status = status
        self.message = message


@attrs.define
class Request:
    """
    One request-response cycle: what the parser has told us of a request so far, then
    what its answer needs.

    :ivar head: bytes of header names and values so far, against :data:`MAX_HEADERS`
    :ivar length: the declared ``Content-Length``, or None
    :ivar expect_continue: whether the client waits for ``100 Continue``
    :ivar chunks: the body's parts while it arrives
    :ivar size: the body's size so far
    :ivar method: the request method, once the request is complete
    :ivar keep_alive: whether the connection stays open after the answer
    :ivar http10: whether the request was HTTP/1.0
    :ivar body: the whole body, once the request is complete
    """

    url: bytes = b""
    head: int = 0
    length: int | None = None
    expect_continue: bool = False
    chunks: list[bytes] | None = attrs.Factory(list)
    size: int = 0
    method: bytes = b""
    keep_alive: bool = True
    http10: bool = False
    body: bytes = b""
    #: A GET's header lines, kept only for a possible upgrade (see ``factory.upgrade``).
    headers: list[bytes] | None = None
    #: For an upgrade request: the bytes that followed its head.
    upgrade: bytes | None = None


class _HTTPDate:
    """The Date header value, formatted at most once a second."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode("ascii")
        return self._value


#: ``http_date()``: the value of the ``Date`` header now.
http_date = _HTTPDate()


def response(
    request: Request, status: int, ctype: bytes | None, body: bytes, extra: bytes = b""
) -> bytes:
    """
    The bytes of an answer to ``request``, head and body, as the connection it came on
    wants them: ``Connection: close`` when it ends after this answer, ``keep-alive`` for
    an HTTP/1.0 client that keeps it, no body for a ``HEAD``.

    :param request: the :class:`Request` answered
    :param status: the HTTP status (one of :data:`STATUS_LINES`)
    :param ctype: the ``Content-Type``, or None for none
    :param body: the body (its length is sent unless the status is 204)
    :param extra: more header lines, each ending in CRLF
    :return: the bytes to send
    """
    head = [b"%sDate: %s\r\n" % (STATUS_LINES[status], http_date())]
    if ctype is not None:
        head.append(b"Content-Type: %s\r\n" % ctype)
    if status != 204:
        head.append(b"Content-Length: %d\r\n" % len(body))
    if extra:
        head.append(extra)
    if not request.keep_alive:
        head.append(b"Connection: close\r\n")
    elif request.http10:
        head.append(b"Connection: keep-alive\r\n")
    head.append(b"\r\n")
    if request.method != b"HEAD":
        head.append(body)
    return b"".join(head)


def refuse_and_linger(
    transport: Any, status: int, body: bytes, linger: float, clock: IReactorTime
) -> IDelayedCall | None:
    """
    Answer an error and close the connection, without ever reading the rest of the
    request.

    A client usually sends its whole body before reading the answer; closing at once
    with its body unread makes the kernel reset the connection, and the client sees a
    broken pipe instead of our status.  So, like nginx's lingering close, we close our
    side for writing and let the caller discard what still comes, for at most
    ``linger`` seconds.

    :param transport: the connection's transport
    :param status: the HTTP status
    :param body: the text of the answer
    :param linger: seconds to go on reading (and discarding) before the close
    :param clock: the reactor
    :return: the timer of the final close, to cancel if the connection is lost first
    """
    transport.write(
        b"%sDate: %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (STATUS_LINES[status], http_date(), len(body), body)
    )
    if ISSLTransport.providedBy(transport):
        # TLS cannot half-close (the lookup would reach the TCP socket under it): go
        # on discarding what comes, then close.
        return clock.callLater(linger, _close_tls, transport)
    half_close = getattr(transport, "loseWriteConnection", None)
    if half_close is None:
        transport.loseConnection()
        return None
    half_close()
    return clock.callLater(linger, transport.abortConnection)


class RequestParsing:
    """
    The callbacks of an ``httptools.HttpRequestParser``: they build one :class:`Request`
    per request and queue it complete, refusing (:class:`Refused`) as soon as a limit is
    passed.  The connection that feeds the parser is
    :class:`~hero_compute.rpc.http_server.RpcHTTPProtocol`.
    """

    # What the connection holds (see RpcHTTPProtocol).
    factory: Any
    transport: Any
    _parser: Any = None  # an httptools.HttpRequestParser: httptools has no types
    _parsing: Request | None = None
    _queue: list[Request]
    _inflight: Any
    _in_head = False
    _head_timer: IDelayedCall | None = None

    def on_message_begin(self) -> None:
        self._parsing = Request()
        self._in_head = True

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None

    def on_url(self, url: bytes) -> None:
        request = self._parsing
        assert request is not None
        if self.factory.upgrade is not None and not request.url:
            # Only a GET can be an upgrade: RPC requests pay nothing for keeping heads.
            if self._parser.get_method() == b"GET":
                request.headers = []
        request.url += url
        if len(request.url) > MAX_URL:
            raise Refused(414, b"request target longer than %d bytes\n" % MAX_URL)

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._parsing
        assert request is not None
        request.head += len(name) + len(value)
        if request.head > MAX_HEADERS:
            raise Refused(431, b"request headers larger than %d bytes\n" % MAX_HEADERS)
        if request.headers is not None:
            request.headers.append(b"%s: %s\r\n" % (name, value))
        name = name.lower()
        if name == b"content-length":
            request.length = int(value) if value.strip().isdigit() else None
        elif name == b"expect" and value.lower() == b"100-continue":
            request.expect_continue = True
        elif name in BROWSER_HEADERS:
            # One set lookup per header, last: Content-Length, in every request, pays
            # nothing for it.  Counted and logged (rate-limited) as refusals at accept.
            self.factory.admission.refused("browser", self.transport)
            raise Refused(403, BROWSER_REFUSED)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        request = self._parsing
        assert request is not None
        if request.length is not None and request.length > self.factory.max_body:
            raise Refused(
                413, b"request body larger than %d bytes\n" % self.factory.max_body
            )
        if (
            request.expect_continue
            and self._parser.get_http_version() == "1.1"
            and self._inflight is None
            and not self._queue
        ):
            # curl and others wait for this (a second, or forever) before sending
            # the body.  Not while an earlier answer is due: it would come first.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        assert request is not None and request.chunks is not None
        request.size += len(body)
        if request.size > self.factory.max_body:
            request.chunks = []
            raise Refused(
                413, b"request body larger than %d bytes\n" % self.factory.max_body
            )
        request.chunks.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        request, self._parsing = self._parsing, None
        assert request is not None and request.chunks is not None
        request.method = parser.get_method()
        request.keep_alive = parser.should_keep_alive()
        request.http10 = parser.get_http_version() == "1.0"
        request.body = b"".join(request.chunks)
        request.chunks = None
        self._queue.append(request)


def _close_tls(transport: Any) -> None:
    """
    End a refused TLS connection at the end of its linger: our ``close_notify``, then
    the abort that ends a TCP one (see :func:`refuse_and_linger`).

    A TLS transport closes only once no producer is registered (our protocol is, for
    back-pressure, until it is lost), then waits for the peer's ``close_notify``: a
    plain ``loseConnection`` kept a refused connection, its descriptor and its
    admission, for as long as the peer kept its end open.
    """
    transport.unregisterProducer()
    transport.loseConnection()
    transport.abortConnection()
