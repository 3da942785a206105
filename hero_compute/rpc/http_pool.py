"""
HTTP/1.1 connections to JSON-RPC peers, and the pool that keeps them between calls: the
mechanism under :class:`~hero_compute.rpc.http_client.RpcClient`.

A connection carries one request at a time and releases itself to the pool when its
response is complete; the pool keeps idle ones per peer (and per TLS peer expected
there) and times them out.  Like the server, it speaks HTTP/1.1 through ``httptools``
rather than ``twisted.web``'s Agent: one POST with a known length to a known peer needs
none of its generality.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import httptools
from twisted.internet import defer, protocol
from twisted.internet import error as ierror
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.python.failure import Failure

from .addresses import Address
from .errors import BadResponse, ConnectionRefused, ResponseTooLarge
from .limits import DEFAULTS
from .sendnow import send_now

#: Responses larger than this are refused, so a misbehaving peer cannot make us buffer
#: without bound (a proxied result passes through the explorer's memory): by default as
#: large as a server of ours may answer (``HERO_MAX_RESPONSE``).
MAX_RESPONSE = DEFAULTS.max_response

#: Seconds a pooled idle connection is kept; below the server's idle timeout so that
#: it is the client that closes, never the server under a request being sent.
POOL_IDLE = 50

#: Idle connections kept per peer: as many as the explorer lets run at once to one node
#: (``EXPLORER_CALLS_PER_NODE``).  With fewer, every call beyond them closed its
#: connection when done and the next one opened a new one: under 8 concurrent
#: ``explorer.call`` a pool of 4 spent more time connecting than calling.
MAX_IDLE_PER_PEER = DEFAULTS.calls_per_node

if TYPE_CHECKING:
    from .tls import ClientTLS, Expected

#: Seconds by which a connection's deadline may come early.
_SLACK = 1e-4

#: A peer address and the TLS peer expected there: what pooled connections are kept by.
Key = tuple[Address, "Expected | None"]
#: An HTTP response: its status and its body.
Response = tuple[int, bytes]


class Closed(Exception):
    """The connection ended before a whole response arrived."""


class _TooLarge(Exception):
    """The response body grew past :data:`MAX_RESPONSE`."""


class HTTPConnection(protocol.Protocol):
    """
    One HTTP/1.1 connection to a peer, carrying one request at a time.

    It has one timer, for whichever deadline it is under: its call's timeout while a
    request is in flight (the call then fails and the connection is aborted), the
    pool's idle time while it waits in the pool (it is then closed).  Moving a deadline
    later, what every call and every release does, touches no timer: the timer fires
    at the earlier deadline, finds the later one and waits again.

    :ivar done: while a request is in flight, the Deferred of its (status, body)
    """

    done: defer.Deferred[Response] | None = None
    lost = False
    #: Over TLS, ``(identity, serial, not_before)`` of the peer's certificate, once read.
    peer: tuple[Any, int, float] | None = None
    _timer: IDelayedCall | None = None
    # Connected over TCP, Unix or TLS: all of them can be aborted.
    transport: ITCPTransport

    def __init__(self, pool: Pool, address: Address, key: Key) -> None:
        self._pool = pool
        self._clock = pool.reactor
        self.address = address
        #: The pool's key: the address, and the TLS peer expected there.
        self.key = key
        #: The pool's generation when this connection was made.
        self.generation = pool.generation
        self._deadline = 0.0

    def connectionMade(self) -> None:
        self._parser: Any = httptools.HttpResponseParser(self)

    def request(self, body: bytes, timeout: float) -> defer.Deferred[Response]:
        """
        Send one POST; fires with ``(status, body)``, or fails with
        :class:`twisted.internet.defer.TimeoutError` after ``timeout`` seconds.
        """
        done = self.done = defer.Deferred(self._cancel)
        self._chunks: list[bytes] = []
        self._size = 0
        self._complete = False
        self._headed = False
        self._delimited = False
        self.expire_in(timeout)
        send_now(
            self.transport,
            b"POST /rpc HTTP/1.1\r\nHost: hero-compute\r\nUser-Agent: hero_compute\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body),
        )
        return done

    def expire_in(self, seconds: float) -> None:
        """
        Set the deadline: ``seconds`` from now the call in flight times out, or, with
        none, the connection closes.
        """
        self._deadline = deadline = self._clock.seconds() + seconds
        timer = self._timer
        if timer is not None:
            if timer.getTime() <= deadline:
                return
            timer.cancel()
        self._timer = self._clock.callLater(seconds, self._expire)

    def _expire(self) -> None:
        self._timer = None
        left = self._deadline - self._clock.seconds()
        # Not "> 0": a deadline a rounding error away would come back at once for ever.
        if left > _SLACK:
            self._timer = self._clock.callLater(left, self._expire)
        elif self.done is not None:
            self._fail(defer.TimeoutError())
        else:
            self.transport.loseConnection()

    def _cancel(self, d: defer.Deferred[Response]) -> None:
        # The caller gave up: this connection is in an unknown state.
        if self.done is d:
            self.done = None
        self.transport.abortConnection()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._delimited = True

    def on_headers_complete(self) -> None:
        self._headed = True
        self._status: int = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._pool.max_response:
            raise _TooLarge()
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        # Asked here: llhttp forgets it once the callback returns.
        self._complete = True
        self._keep_alive: bool = self._parser.should_keep_alive()
        self._status = self._parser.get_status_code()

    def dataReceived(self, data: bytes) -> None:
        if self.done is None:
            # Nothing asked: an idle peer talking out of turn cannot be trusted.
            self.transport.abortConnection()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if not isinstance(e.__context__, _TooLarge):
                raise
            self._fail(ResponseTooLarge(self.address, self._pool.max_response))
            return
        except httptools.HttpParserError as e:
            self._fail(BadResponse(self.address, f"not an HTTP response: {e}"))
            return
        if self._complete:
            d, self.done = self.done, None
            chunks = self._chunks
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._chunks = []
            if self._keep_alive:
                self._pool.release(self)
            else:
                self.transport.loseConnection()
            d.callback((self._status, body))

    def _fail(self, reason: Exception) -> None:
        d, self.done = self.done, None
        assert d is not None  # only while a request is in flight
        self.transport.abortConnection()
        d.errback(reason)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True
        self._parser = None  # it holds our callbacks: no cycle, freed at once
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pool.forget(self)
        if self.done is not None:
            d, self.done = self.done, None
            if self._headed and not self._delimited and reason.check(ierror.ConnectionDone):
                # A body without length or chunks ends where the connection does.
                d.callback((self._status, b"".join(self._chunks)))
            else:
                d.errback(Closed())


class Pool:
    """
    Idle persistent connections by peer address, at most ``max_per_peer`` each, closed
    after :data:`POOL_IDLE` seconds unused (a released connection is given that
    deadline).
    """

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float,
        max_per_peer: int,
        tls: ClientTLS | None = None,
    ) -> None:
        self.reactor = reactor
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._max = max_per_peer
        self._idle: dict[Key, list[HTTPConnection]] = {}
        self._all: set[HTTPConnection] = set()
        self._closing: list[defer.Deferred[None]] = []
        self._closed = False
        self.max_response = MAX_RESPONSE
        #: Connections made before the last retire() are not reused (old TLS material).
        self.generation = 0

    def take(self, key: Key) -> HTTPConnection | None:
        """
        :param key: a peer address and the TLS peer expected there
        :return: an idle connection to it, now the caller's, or None
        """
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.lost or getattr(conn.transport, "disconnecting", False):
                continue
            if key[1] is not None and not self._still_trusted(conn):
                # Its certificate was revoked or superseded since the handshake.
                conn.transport.loseConnection()
                continue
            return conn
        return None

    def _still_trusted(self, conn: HTTPConnection) -> bool:
        tls = self._tls
        if tls is None or tls.peer_check is None:
            return True
        if conn.peer is None:
            conn.peer = tls.peer_of(conn.transport)
        return conn.peer is not None and tls.accepts(*conn.peer)

    def get(
        self, address: Address, expect: Expected | None = None
    ) -> defer.Deferred[HTTPConnection]:
        """
        :param address: an :class:`.Address`
        :param expect: over TLS, the :class:`~hero_compute.rpc.tls.Expected` peer; a
            connection verified for one peer is never reused for another
        :return: a Deferred of a connected :class:`HTTPConnection` to ``address``
        """
        conn = self.take((address, expect))
        if conn is not None:
            return defer.succeed(conn)
        return self.connect(address, expect)

    def connect(
        self, address: Address, expect: Expected | None = None
    ) -> defer.Deferred[HTTPConnection]:
        """
        :return: a Deferred of a new :class:`HTTPConnection` to ``address``
        """
        key = (address, expect)
        creator = None
        if address.scheme == "tls" and self._tls is not None:
            creator = self._tls if expect is None else self._tls.expecting(expect)
        try:
            endpoint = address.client_endpoint(self.reactor, self._connect_timeout, creator)
        except ValueError as e:
            return defer.fail(ConnectionRefused(address, str(e)))
        factory = protocol.Factory()
        factory.noisy = False
        factory.protocol = lambda: HTTPConnection(self, address, key)
        # The factory makes nothing but HTTPConnection.
        d = cast("defer.Deferred[HTTPConnection]", endpoint.connect(factory))
        d.addCallback(self._track)
        return d

    def _track(self, conn: HTTPConnection) -> HTTPConnection:
        self._all.add(conn)
        return conn

    def use_tls(self, tls: ClientTLS) -> None:
        """
        Make ``tls://`` connections with this material from now on; connections made
        with the old one are not reused.

        :param tls: a :class:`~hero_compute.rpc.tls.ClientTLS`
        """
        self._tls = tls
        self.retire()

    def retire(self) -> None:
        """
        Make new connections from now on: idle ones close now, busy ones once their
        call is done.  After a certificate renewal, so that the peer sees the new one.
        """
        self.generation += 1
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.transport.loseConnection()

    def release(self, conn: HTTPConnection) -> None:
        """Put a connection whose response is complete back for reuse."""
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        if (
            self._closed
            or len(idle) >= self._max
            or conn.generation != self.generation
            or conn.lost
        ):
            conn.transport.loseConnection()
            return
        idle.append(conn)
        conn.expire_in(POOL_IDLE)

    def forget(self, conn: HTTPConnection) -> None:
        """Drop a connection that is gone."""
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None:
            if conn in idle:
                idle.remove(conn)
            if not idle:
                del self._idle[conn.key]
        if not self._all and self._closing:
            waiters, self._closing = self._closing, []
            for waiter in waiters:
                waiter.callback(None)

    def close(self) -> defer.Deferred[None]:
        """
        Close every connection; fires once all are gone.  Calls still running finish,
        and their connections are closed rather than kept.
        """
        self._closed = True
        if not self._all:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._closing.append(waiter)
        for conn in list(self._all):
            conn.transport.loseConnection()
        return waiter
