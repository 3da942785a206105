"""
HTTP/1.1 for the JSON-RPC endpoint: ``POST /rpc`` runs the body through a
:class:`~hero_compute.rpc.dispatch.Dispatcher`; other paths are 404, other verbs 405.

We parse with ``httptools`` (llhttp, the parser of Node.js) rather than through
``twisted.web.server``: a call costs about a third of the CPU it took there (see the
README's performance section), and nothing of twisted.web's resource tree, sessions or
forms applies to one JSON endpoint.  As in uvicorn's ``httptools_impl``, each request is
one record (:class:`Request`) from its first byte to its answer; the protocol holds only
the connection's state.  Who may connect at all is decided at accept, in
:mod:`.admission`; a ``GET`` may switch protocols (a WebSocket) through :mod:`.upgrade`.
"""

from __future__ import annotations

from typing import Any

import httptools
from twisted.internet import defer, protocol
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .admission import Admission, peer_host
from .backpressure import Backpressure
from .dispatch import Answer, CallContext, Dispatcher
from .http_wire import (
    MAX_BODY,
    TEXT,
    Refused,
    Request,
    RequestParsing,
    refuse_and_linger,
    response,
)
from .idle import IdleSweep
from .limits import Limits
from .sendnow import send_now
from .upgrade import Upgrading

log = Logger()

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


@implementer(IPushProducer)
class RpcHTTPProtocol(Upgrading, RequestParsing, Backpressure, protocol.Protocol):
    """
    HTTP/1.1 for one connection to a dispatcher.

    The rules kept: persistent connections (HTTP/1.1 by default, HTTP/1.0 on request),
    pipelined requests answered in order, chunked bodies, ``Expect: 100-continue``,
    bodies over ``max_body`` refused with 413 from the headers alone or as soon as they
    grow past it, never buffered beyond it, idle connections closed, and a call
    cancelled when its client hangs up.

    Against a hostile peer (CONTRACT §7): a request head must arrive within
    ``head_timeout`` of its first byte (408), however slowly it trickles; a peer that
    does not read its answers is not read either (:class:`.Backpressure`).
    """

    factory: RpcHTTPFactory
    # A TCP, Unix or TLS transport: ITCPTransport (abortConnection) and IPushProducer
    # (pauseProducing), which no one interface of Twisted's names.
    transport: Any
    _context: CallContext | None = None
    _closing = False
    _lost = False
    _linger: IDelayedCall | None = None
    _inflight: defer.Deferred[bytes | None] | None = None
    _refusal: tuple[int, bytes] | None = None
    _answering = False
    _host: str | None = None
    #: Whether we admitted it (not a TLS layer in front): we then release it.
    _counted = False
    #: Since when the connection is idle (no byte received, nothing in flight), for
    #: the factory's idle sweep; None while a call runs or a refusal lingers.
    _idle_since: float | None = None

    def connectionMade(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        # A list, not a deque: it rarely holds more than one request, and an empty
        # deque costs 600 bytes per connection (a fleet holds tens of thousands).
        self._queue: list[Request] = []
        self._paused = False
        self._idle_since = self.factory.clock.seconds()
        self.factory.opened(self)
        self._produce(READ_SIZE)

    # -- the connection

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self.factory.admission.refused("head_timeout", self.transport)
        timeout = self.factory.limits.head_timeout
        self._refuse(408, b"request head not complete within %g s\n" % timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._pass_on(data) or self._closing or self._refusal is not None:
            return  # upgraded (the new protocol's), or refused: read and discard
        if self._inflight is None:
            self._idle_since = self.factory.clock.seconds()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            refused = e.__context__
            if not isinstance(refused, Refused):
                raise
            self._refusal = (refused.status, refused.message)
        except httptools.HttpParserUpgrade as e:
            # What follows an upgrade's head is the new protocol's: the hook's, else
            # the request is refused whole.
            if not self._upgrade_asked(data, e.args[0]):
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

    def _answer(self, request: Request) -> None:
        if request.upgrade is not None:
            self._take_over(request)
            return
        path = request.url.split(b"?", 1)[0]
        if not path.startswith(b"/"):
            try:
                path = httptools.parse_url(request.url).path or b"/"
            except httptools.HttpParserInvalidURLError:
                self._send(request, 400, TEXT, b"malformed URL\n")
                return
        if path not in (b"/rpc", b"/rpc/"):
            self._send(request, 404, TEXT, b"no such resource\n")
            return
        if request.method != b"POST":
            self._send(
                request, 405, TEXT, b"only POST is allowed on /rpc\n", b"Allow: POST\r\n"
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
            self._send(request, 500, TEXT, b"internal error\n")
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

    def _answered(self, payload: bytes | None, request: Request) -> None:
        self._inflight = None
        if self._lost or self._closing:
            # Refused or closed meanwhile: an answer now would come after the refusal.
            return
        self._respond(payload, request)
        self._next()

    def _respond(self, payload: bytes | None, request: Request) -> None:
        if payload is None:
            # Only notifications: JSON-RPC says send nothing, HTTP says 204.
            self._send(request, 204, None, b"")
        else:
            self._send(request, 200, b"application/json", payload)

    def _failed(self, failure: Failure, request: Request) -> None:
        self._inflight = None
        if self._lost or self._closing or failure.check(defer.CancelledError):
            return
        log.failure("answering an RPC request failed", failure)
        self._send(request, 500, TEXT, b"internal error\n")
        self._next()

    def _send(
        self,
        request: Request,
        status: int,
        ctype: bytes | None,
        body: bytes,
        extra: bytes = b"",
    ) -> None:
        data = response(request, status, ctype, body, extra)
        send_now(self.transport, data)
        if self._unsent is not None:
            self._count_unsent(len(data))
        if not request.keep_alive:
            self._closing = True
            # The idle timer stays: a peer that never reads its answer is cut off.
            self._idle_since = self.factory.clock.seconds()
            # As twisted.web's channel does: a TLS transport sends its close_notify,
            # and closes, only once no producer is registered (we produce nothing
            # more), else the connection stays open until the idle timeout.
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def _refuse(self, status: int, body: bytes) -> None:
        """
        Answer an error and close the connection, lingering (see
        :func:`~hero_compute.rpc.http_wire.refuse_and_linger`): the rest of the request
        is read and discarded, never buffered.
        """
        if self._closing:
            return
        self._closing = True
        self._queue.clear()
        self._idle_since = None
        self._stop_head_timer()
        self._paused = False
        self._update_reading()
        self._linger = refuse_and_linger(
            self.transport, status, body, self.factory.linger, self.factory.clock
        )

    def timeoutConnection(self) -> None:
        """Idle for longer than the factory's ``idle_timeout``: cut off."""
        self._idle_since = None
        # Abort, not close: a peer that stopped reading would keep a close waiting on
        # our unsent answer for ever.
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost = True
        self._upgraded_lost(reason)
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
    upgrade: Any = None  # the upgrade hook (see .upgrade); None refuses them with 400
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
        #: Who may connect, counted at accept: shared by our listeners (TLS too);
        #: the dashboard and metrics have siblings of it.
        self.admission = Admission(self.limits, self.clock)
        self._idle = IdleSweep(self.clock, idle_timeout)
        self._connections = self._idle.connections

    def buildProtocol(self, addr: IAddress) -> RpcHTTPProtocol | None:  # type: ignore[override]  # None refuses, as Twisted allows
        host = peer_host(addr)
        if not self.admission.admit(host):
            return None
        proto = self.build_admitted(addr)
        proto._host, proto._counted = host, True
        return proto

    def build_admitted(self, addr: IAddress) -> RpcHTTPProtocol:
        """
        The protocol of a connection admitted in front of us (by the TLS layer, see
        :class:`~hero_compute.rpc.admission.AdmittedTLSFactory`): it counts nothing.
        """
        proto = protocol.Factory.buildProtocol(self, addr)
        assert isinstance(proto, RpcHTTPProtocol)
        return proto

    def opened(self, proto: RpcHTTPProtocol) -> None:
        """A connection of ours is up: it is swept when idle."""
        self._idle.add(proto)

    def closed(self, proto: RpcHTTPProtocol) -> None:
        """A connection of ours is gone."""
        self._idle.discard(proto)
        if proto._counted:
            self.admission.release(proto._host)


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
