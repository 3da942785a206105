"""
HTTP/1.1 for the JSON-RPC endpoint: ``POST /rpc`` runs the body through a
:class:`~hero_compute.rpc.dispatch.Dispatcher`; other paths are 404, other verbs 405.

We parse with ``httptools`` (llhttp, the parser of Node.js) rather than through
``twisted.web.server``: a call costs about a third of the CPU it took there (see the
README's performance section), and nothing of twisted.web's resource tree, sessions or
forms applies to one JSON endpoint.  As in uvicorn's ``httptools_impl``, each request is
one record (:class:`_Request`) from its first byte to its answer; the protocol holds only
the connection's state.

Long because: it is one state machine (parsing, pipelining,
refusing, lingering, idling): split, its rules would have to be read in two places.
"""

from __future__ import annotations

import collections
import os
import resource
import time
from collections.abc import Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import attrs
import httptools
from twisted.internet import defer, protocol, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .dispatch import Answer, CallContext, Dispatcher
from .limits import Limits
from .sendnow import send_now
from .slices import in_slices

log = Logger()

#: Request bodies above this many bytes are refused with 413 before being read.
MAX_BODY = 1024 * 1024

#: Limits on what precedes a body: generous for JSON-RPC, small enough that a peer
#: cannot make us buffer much.
MAX_URL = 8 * 1024
MAX_HEADERS = 64 * 1024

#: Pipelined requests parsed ahead of the one being answered before we stop reading.
MAX_QUEUED = 16

#: Bytes asked of the socket per read (Twisted's default): see ``connectionMade``.
READ_SIZE = 64 * 1024

#: Seconds a refused oversized body is still read (and discarded) after the 413, so that
#: the client gets to read the 413 instead of a connection reset.
LINGER = 2.0

#: Seconds an idle keep-alive connection is kept open.  Clients' pools close theirs
#: sooner (see :data:`hero_compute.rpc.http_client.POOL_IDLE`), so the server rarely
#: closes one under a request in flight.
IDLE_TIMEOUT = 75

#: Idle connections are swept this many times per ``idle_timeout``: one is closed
#: between ``idle_timeout`` and a quarter more of it after its last byte.
IDLE_SWEEPS = 4

#: The status line of every status we send, reason phrase from :class:`http.HTTPStatus`.
#: Call sites name statuses by number: an ``HTTPStatus`` member costs a Python-level
#: ``__hash__`` per lookup, about a microsecond a request in all.
_STATUS_LINES = {
    status: b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode("ascii"))
    for status in (200, 204, 400, 404, 405, 408, 413, 414, 431, 500)
}

_TEXT = b"text/plain; charset=utf-8"


class _Refused(Exception):
    """Raised from a parser callback to stop reading a request we will not serve."""

    def __init__(self, status: int, message: bytes) -> None:
        Exception.__init__(self, status, message)
        self.status = status
        self.message = message


@attrs.define
class _Request:
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


_http_date = _HTTPDate()


@implementer(IPushProducer)
class RpcHTTPProtocol(protocol.Protocol):
    """
    HTTP/1.1 for one connection to a dispatcher.

    The rules kept: persistent connections (HTTP/1.1 by default, HTTP/1.0 on request),
    pipelined requests answered in order, chunked bodies, ``Expect: 100-continue``,
    bodies over ``max_body`` refused with 413 from the headers alone or as soon as they
    grow past it, never buffered beyond it, idle connections closed, and a call
    cancelled when its client hangs up.

    Against a hostile peer (CONTRACT §7): a request head must arrive within
    ``head_timeout`` of its first byte (408), however slowly it trickles; and we are the
    transport's producer, so once ``max_unsent`` bytes of answers wait for a peer that
    does not read, we stop reading (and answering) it until they drain.
    """

    factory: RpcHTTPFactory
    # A TCP, Unix or TLS transport: ITCPTransport (abortConnection) and IPushProducer
    # (pauseProducing), which no one interface of Twisted's names.
    transport: Any
    _parser: Any = None  # an httptools.HttpRequestParser: httptools has no types
    _parsing: _Request | None = None
    _context: CallContext | None = None
    _closing = False
    _lost = False
    _linger: IDelayedCall | None = None
    _inflight: defer.Deferred[bytes | None] | None = None
    _refusal: tuple[int, bytes] | None = None
    _answering = False
    _head_timer: IDelayedCall | None = None
    _in_head = False
    _write_paused = False
    #: Bytes of answers counted as waiting since the transport said it holds more than
    #: its buffer size, or None when it has not (or has drained since).
    _unsent: int | None = None
    _reading_paused = False
    _host: str | None = None
    #: Since when the connection is idle (no byte received, nothing in flight), for
    #: the factory's idle sweep; None while a call runs or a refusal lingers.
    _idle_since: float | None = None
    #: What took the connection over after an upgrade (a WebSocket): it gets every
    #: byte and the transport's producer calls from then on.
    _upgraded: Any = None

    def connectionMade(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        # A list, not a deque: it rarely holds more than one request, and an empty
        # deque costs 600 bytes per connection (a fleet holds tens of thousands).
        self._queue: list[_Request] = []
        self._paused = False
        self._idle_since = self.factory.clock.seconds()
        self.factory.opened(self)
        # The transport tells us when answers pile up unsent past its buffer size,
        # and when they have drained.  That size is also how much Twisted asks of the
        # socket per read, and a read of a megabyte costs about 30 us more than one of
        # 64 kB however little arrives: it stays small, and we count the rest of our
        # limit ourselves (pauseProducing).
        self._buffer_size = min(self.factory.limits.max_unsent, READ_SIZE)
        transport = self.transport
        while transport is not None:
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = self._buffer_size
            transport = getattr(transport, "transport", None)
        self.transport.registerProducer(self, True)

    # -- IPushProducer: the transport's verdict on our unsent output

    def pauseProducing(self) -> None:
        if self._upgraded is not None:
            self._upgraded.pauseProducing()
            return
        # More than the transport's buffer size waits unsent: from now until it has
        # drained, every answer counts towards our limit (an upper bound: some of it
        # may go out meanwhile).
        if self._unsent is None:
            self._unsent = self._buffer_size
        self._count_unsent(0)

    def _count_unsent(self, sent: int) -> None:
        assert self._unsent is not None
        self._unsent += sent
        if self._unsent > self.factory.limits.max_unsent and not self._write_paused:
            self._write_paused = True
            self._update_reading()

    def resumeProducing(self) -> None:
        if self._upgraded is not None:
            self._upgraded.resumeProducing()
            return
        self._unsent = None
        self._write_paused = False
        self._update_reading()
        if not self._lost:
            self._next()

    def stopProducing(self) -> None:
        pass

    def _update_reading(self) -> None:
        paused = self._paused or self._write_paused
        if paused != self._reading_paused and not self._lost:
            self._reading_paused = paused
            if paused:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    # -- parsing (httptools callbacks)

    def on_message_begin(self) -> None:
        self._parsing = _Request()
        self._in_head = True

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self.factory.refused("head_timeout", self.transport)
        self._refuse(
            408,
            b"request head not complete within %g s\n" % self.factory.limits.head_timeout,
        )

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
            raise _Refused(414, b"request target longer than %d bytes\n" % MAX_URL)

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._parsing
        assert request is not None
        request.head += len(name) + len(value)
        if request.head > MAX_HEADERS:
            raise _Refused(431, b"request headers larger than %d bytes\n" % MAX_HEADERS)
        if request.headers is not None:
            request.headers.append(b"%s: %s\r\n" % (name, value))
        name = name.lower()
        if name == b"content-length":
            request.length = int(value) if value.strip().isdigit() else None
        elif name == b"expect" and value.lower() == b"100-continue":
            request.expect_continue = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._stop_head_timer()
        request = self._parsing
        assert request is not None
        if request.length is not None and request.length > self.factory.max_body:
            raise _Refused(
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
            raise _Refused(
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

    # -- the connection

    def dataReceived(self, data: bytes) -> None:
        if self._upgraded is not None:
            self._upgraded.dataReceived(data)
            return
        if self._queue and self._queue[-1].upgrade is not None:
            # Bytes after an upgrade request not yet taken over: the new protocol's.
            self._queue[-1].upgrade += data
            return
        if self._closing or self._refusal is not None:
            return  # refused: read and discard
        if self._inflight is None:
            self._idle_since = self.factory.clock.seconds()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            refused = e.__context__
            if not isinstance(refused, _Refused):
                raise
            self._refusal = (refused.status, refused.message)
        except httptools.HttpParserUpgrade as e:
            # llhttp leaves what follows an upgrade request unread (it would be the
            # other protocol's): a WebSocket route takes it, else it is refused whole.
            if self._queue and self._queue[-1].headers is not None:
                self._queue[-1].upgrade = data[e.args[0] :]
            else:
                self._queue.pop()
                self._refusal = (400, b"protocol upgrades are not supported\n")
        except httptools.HttpParserError as e:
            self._refusal = (
                400,
                b"malformed HTTP request: %s\n" % str(e).encode("ascii", "replace"),
            )
        if self._in_head and self._head_timer is None and self._refusal is None:
            # A head left unfinished by this read gets its own deadline, counted from
            # now: the idle timer is reset by every byte, so one byte every few seconds
            # would keep it open for ever.  (Armed only then: a head that arrives whole,
            # nearly every one, costs no timer.)
            self._head_timer = self.factory.clock.callLater(
                self.factory.limits.head_timeout, self._head_too_slow
            )
        if len(self._queue) > MAX_QUEUED and not self._paused:
            self._paused = True
            self._update_reading()
        self._next()

    def _next(self) -> None:
        if self._answering or self._upgraded is not None:
            return  # an answer that came at once, inside the loop below: it goes on
        self._answering = True
        try:
            while (
                self._queue
                and self._inflight is None
                and not self._closing
                and not self._write_paused
            ):
                self._answer(self._queue.pop(0))
        finally:
            self._answering = False
        if self._closing or self._inflight is not None or self._upgraded is not None:
            return
        if self._refusal is not None and not self._queue:
            # Every request before the bad one is answered: now the refusal.
            self._refuse(*self._refusal)
            return
        if self._paused and len(self._queue) <= MAX_QUEUED // 2:
            self._paused = False
            self._update_reading()
        if self._idle_since is None:
            self._idle_since = self.factory.clock.seconds()

    def _answer(self, request: _Request) -> None:
        if request.upgrade is not None:
            self._take_over(request)
            return
        path = request.url.split(b"?", 1)[0]
        if not path.startswith(b"/"):
            try:
                path = httptools.parse_url(request.url).path or b"/"
            except httptools.HttpParserInvalidURLError:
                self._send(request, 400, _TEXT, b"malformed URL\n")
                return
        if path not in (b"/rpc", b"/rpc/"):
            self._send(request, 404, _TEXT, b"no such resource\n")
            return
        if request.method != b"POST":
            self._send(
                request, 405, _TEXT, b"only POST is allowed on /rpc\n", b"Allow: POST\r\n"
            )
            return
        if self._context is None:
            # The addresses of a connection do not change: one system call each, once.
            self._context = CallContext.from_transport(
                self.transport, self.factory.trust_domain
            )
        try:
            answer: Answer = self.factory.dispatcher.answer(request.body, self._context)
        except Exception:
            # The dispatcher answers every error itself; this is a bug, not a caller's.
            log.failure("answering an RPC request failed")
            self._send(request, 500, _TEXT, b"internal error\n")
            return
        if not isinstance(answer, defer.Deferred):
            self._respond(answer, request)
            return
        # A call in progress is bounded by its own timeouts, not the idle one.
        self._idle_since = None
        self._inflight = answer
        answer.addCallbacks(
            self._answered, self._failed, callbackArgs=(request,), errbackArgs=(request,)
        )

    def _take_over(self, request: _Request) -> None:
        """Hand the connection to the upgrade hook, with the request's head as sent."""
        assert request.headers is not None and request.upgrade is not None
        head = b"GET %s HTTP/1.1\r\n%s\r\n" % (request.url, b"".join(request.headers))
        context = CallContext.from_transport(self.transport, self.factory.trust_domain)
        # Not idle any more in the HTTP sense: the new protocol has its own rules.
        self._idle_since = None
        self._upgraded = self.factory.upgrade(self.transport, head, context)
        if request.upgrade:
            self._upgraded.dataReceived(request.upgrade)

    def _answered(self, payload: bytes | None, request: _Request) -> None:
        self._inflight = None
        if self._lost or self._closing:
            # Refused or closed meanwhile: an answer now would come after the refusal.
            return
        self._respond(payload, request)
        self._next()

    def _respond(self, payload: bytes | None, request: _Request) -> None:
        if payload is None:
            # Only notifications: JSON-RPC says send nothing, HTTP says 204.
            self._send(request, 204, None, b"")
        else:
            self._send(request, 200, b"application/json", payload)

    def _failed(self, failure: Failure, request: _Request) -> None:
        self._inflight = None
        if self._lost or self._closing or failure.check(defer.CancelledError):
            return
        log.failure("answering an RPC request failed", failure)
        self._send(request, 500, _TEXT, b"internal error\n")
        self._next()

    def _send(
        self,
        request: _Request,
        status: int,
        ctype: bytes | None,
        body: bytes,
        extra: bytes = b"",
    ) -> None:
        head = [b"%sDate: %s\r\n" % (_STATUS_LINES[status], _http_date())]
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
        data = b"".join(head)
        send_now(self.transport, data)
        if self._unsent is not None:
            self._count_unsent(len(data))
        if not request.keep_alive:
            self._closing = True
            # The idle timer stays: a peer that never reads its answer is cut off.
            self._idle_since = self.factory.clock.seconds()
            self.transport.loseConnection()

    def _refuse(self, status: int, body: bytes) -> None:
        """
        Answer an error and close the connection; the rest of the request is never
        buffered.

        A client usually sends its whole body before reading the answer; closing at
        once with its body unread makes the kernel reset the connection, and the client
        sees a broken pipe instead of our status.  So, like nginx's lingering close, we
        close our side for writing and discard what still comes, for at most
        ``factory.linger`` seconds.
        """
        if self._closing:
            return
        self._closing = True
        self._queue.clear()
        self._idle_since = None
        self.transport.write(
            b"%sDate: %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (_STATUS_LINES[status], _http_date(), len(body), body)
        )
        self._stop_head_timer()
        self._paused = False
        self._update_reading()
        linger = self.factory.linger
        if ISSLTransport.providedBy(self.transport):
            # TLS cannot half-close (the lookup would reach the TCP socket under it):
            # go on discarding what comes, then close.
            self._linger = self.factory.clock.callLater(
                linger, self.transport.loseConnection
            )
            return
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.transport.loseConnection()
            return
        half_close()
        self._linger = self.factory.clock.callLater(linger, self.transport.abortConnection)

    def timeoutConnection(self) -> None:
        """Idle for longer than the factory's ``idle_timeout``: cut off."""
        self._idle_since = None
        # Abort, not close: a peer that stopped reading would keep a close waiting on
        # our unsent answer for ever.
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost = True
        if self._upgraded is not None:
            self._upgraded.connectionLost(reason)
            self._upgraded = None
        self._stop_head_timer()
        self.factory.closed(self)
        # The transport holds us as its producer: break that cycle too.
        unregister = getattr(self.transport, "unregisterProducer", None)
        if unregister is not None:
            unregister()
        # The parser holds our callbacks: without this cycle a closed connection is
        # freed at once, not at the next full collection (at fleet scale those are
        # the explorer's longest pauses).
        self._parser = None
        self._parsing = None
        self._idle_since = None
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._queue.clear()
        if self._inflight is not None:
            # The client hung up: stop the work, and answer no one.
            self._inflight.cancel()


class RpcHTTPFactory(protocol.Factory[RpcHTTPProtocol]):
    """
    Serves a dispatcher over HTTP/1.1 with :class:`RpcHTTPProtocol`.

    :ivar dispatcher: the :class:`~hero_compute.rpc.dispatch.Dispatcher`
    :ivar idle_timeout: seconds before an idle connection is closed
    :ivar max_body: request bodies above this many bytes are refused with 413
    :ivar linger: seconds the rest of a refused request is read and discarded
    :ivar clock: the reactor, for timers
    :ivar trust_domain: the fleet's trust domain, by which TLS peers are identified; set
        by the service once its TLS material is loaded (None: no TLS identities)
    """

    protocol = RpcHTTPProtocol
    trust_domain: str | None = None
    #: The upgrade hook, ``upgrade(transport, head, context)`` returning the protocol
    #: that takes the connection over (see :class:`hero_compute.rpc.websocket.Routes`);
    #: None: upgrades are refused with 400.
    upgrade: Any = None
    # One "Starting factory" line per listener is noise in an operator's log.
    noisy = False

    def __init__(
        self,
        dispatcher: Dispatcher,
        idle_timeout: float = IDLE_TIMEOUT,
        max_body: int = MAX_BODY,
        clock: IReactorTime | None = None,
        linger: float = LINGER,
        limits: Limits | None = None,
    ) -> None:
        from twisted.internet import reactor

        self.dispatcher = dispatcher
        self.idle_timeout = idle_timeout
        self.max_body = max_body
        self.linger = linger
        self.clock: IReactorTime = reactor if clock is None else clock
        self.limits = limits or Limits()
        #: Refusals by limit, for metrics.
        self.refusals: collections.Counter[str] = collections.Counter()
        #: Open TCP/TLS connections per peer host (Unix ones are not counted).
        self.per_host: collections.Counter[str] = collections.Counter()
        #: Open connections in all.
        self.open = 0
        self._fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        # Descriptors in use besides our connections, as last counted (and when).
        self._fd_in_use = 0
        self._fd_counted_at = float("-inf")
        self._last_log: dict[str, float] = {}
        self._unlogged: collections.Counter[str] = collections.Counter()
        # Connections, for the idle sweep: one timer for all of them, rather than one
        # per connection re-armed by every read (600 bytes each, and a call per read).
        self._connections: set[RpcHTTPProtocol] = set()
        self._sweeper: task.LoopingCall | None = None

    def buildProtocol(self, addr: IAddress) -> RpcHTTPProtocol | None:  # type: ignore[override]  # None refuses, as Twisted allows
        host = addr.host if isinstance(addr, (IPv4Address, IPv6Address)) else None
        if host is not None:
            limits = self.limits
            if self.per_host[host] >= limits.max_conns_per_addr:
                self.refused("max_conns_per_addr", None, host)
                return None
            if self._descriptors_short():
                # The Unix socket is how the operator gets in to see what is wrong: TCP
                # gives way while the descriptors kept for it would be used.
                self.refused("fd_reserve", None, host)
                return None
        proto = protocol.Factory.buildProtocol(self, addr)
        assert isinstance(proto, RpcHTTPProtocol)
        proto._host = host
        self.open += 1
        if host is not None:
            self.per_host[host] += 1
        return proto

    def _descriptors_short(self) -> bool:
        reserve = self.limits.fd_reserve
        if self._fd_limit <= 0 or self.open + 4 * reserve < self._fd_limit:
            return False  # far from the limit: no system call on the hot path
        # Near it, count what is really open (outgoing connections and files too), but
        # at most twice a second: listing 20,000 descriptors per accept would stall us.
        now = self.clock.seconds()
        if now - self._fd_counted_at > 0.5:
            try:
                self._fd_in_use = len(os.listdir("/proc/self/fd")) - self.open
            except OSError:
                return False
            self._fd_counted_at = now
        return self._fd_in_use + self.open + reserve >= self._fd_limit

    def opened(self, proto: RpcHTTPProtocol) -> None:
        """A connection of ours is up: it is swept when idle."""
        self._connections.add(proto)
        if self._sweeper is None:
            self._sweeper = task.LoopingCall(self._sweep)
            self._sweeper.clock = self.clock
            self._sweeper.start(self.idle_timeout / IDLE_SWEEPS, now=False)

    def _sweep(self) -> defer.Deferred[None] | None:
        """
        Cut off the connections idle for longer than ``idle_timeout`` (tens of
        thousands of them: a slice per reactor turn).
        """
        try:
            return in_slices(self.clock, list(self._connections), self._sweep_some)
        except Exception:
            # A LoopingCall whose function raises stops for good.
            log.failure("idle sweep failed")
            return None

    def _sweep_some(self, protos: Sequence[RpcHTTPProtocol]) -> None:
        since = self.clock.seconds() - self.idle_timeout
        for proto in protos:
            idle = proto._idle_since
            if idle is not None and idle <= since and not proto._lost:
                proto.timeoutConnection()

    def closed(self, proto: RpcHTTPProtocol) -> None:
        """A connection of ours is gone."""
        self._connections.discard(proto)
        if not self._connections and self._sweeper is not None:
            # Nothing to sweep: no timer left behind either.
            self._sweeper.stop()
            self._sweeper = None
        self.open -= 1
        host = proto._host
        if host is not None:
            left = self.per_host[host] - 1
            if left > 0:
                self.per_host[host] = left
            else:
                del self.per_host[host]

    def refused(self, limit: str, transport: Any, host: str | None = None) -> None:
        """
        Count a refusal, and log it at most once per limit every ten seconds (with how
        many more there were): a flood of refusals must not become a flood of logs.
        """
        self.refusals[limit] += 1
        if host is None and transport is not None:
            host = getattr(transport.getPeer(), "host", "unix")
        now = self.clock.seconds()
        if now - self._last_log.get(limit, -1e9) < 10:
            self._unlogged[limit] += 1
            return
        self._last_log[limit] = now
        more = self._unlogged.pop(limit, 0)
        log.warn(
            "refused ({limit}) a connection from {host}{more}",
            limit=limit,
            host=host,
            more=f" (and {more} more since the last such line)" if more else "",
        )


def make_factory(
    dispatcher: Dispatcher, idle_timeout: float = IDLE_TIMEOUT, limits: Limits | None = None
) -> RpcHTTPFactory:
    """
    The HTTP server of ``dispatcher``: ``POST /rpc`` answers JSON-RPC, every other path
    is 404.

    :param dispatcher: a :class:`~hero_compute.rpc.dispatch.Dispatcher`
    :param idle_timeout: seconds before an idle connection is closed
    :param limits: the :class:`~hero_compute.rpc.limits.Limits` against hostile peers
    :return: an :class:`RpcHTTPFactory`, to listen with
    """
    return RpcHTTPFactory(dispatcher, idle_timeout, limits=limits)
