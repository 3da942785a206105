"""
The JSON-RPC client: calls any address URI (unix, tcp, tls) over a pool of persistent
HTTP/1.1 connections, with a per-call timeout.

Failures come out as one of two families: :class:`.RpcError` when the peer answered
with a JSON-RPC error object (same code, message and data), or a
:class:`.TransportError` subclass when no JSON-RPC answer came (refused, timed out,
closed mid-call, not JSON-RPC).

Like the server, it speaks HTTP/1.1 through ``httptools`` rather than ``twisted.web``'s
Agent: the explorer's proxy spent most of its time there (see the README's performance
section), and one POST with a known length to a known peer needs none of its generality.

Long because: the connection, the pool and the client are one mechanism (a connection
releases itself to the pool, the pool times it out, the client maps its failures), and
its type annotations; split, each part would reach into another's internals.
"""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING, Any, cast

import httptools
from twisted.internet import defer, protocol
from twisted.internet import error as ierror
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.python.failure import Failure

from .addresses import Address, AddressError, parse_address
from .dispatch import loads
from .errors import (
    BadResponse,
    CallTimedOut,
    ConnectionClosed,
    ConnectionRefused,
    ConnectTimedOut,
    RpcError,
)
from .sendnow import send_now

#: Responses larger than this are refused, so a misbehaving peer cannot make us buffer
#: without bound (a proxied result passes through the explorer's memory).
MAX_RESPONSE = 16 * 1024 * 1024

#: Seconds a pooled idle connection is kept; below the server's idle timeout so that
#: it is the client that closes, never the server under a request being sent.
POOL_IDLE = 50

#: Idle connections kept per peer: as many as the explorer lets run at once to one node
#: (``EXPLORER_CALLS_PER_NODE``).  With fewer, every call beyond them closed its
#: connection when done and the next one opened a new one: under 8 concurrent
#: ``explorer.call`` a pool of 4 spent more time connecting than calling.
MAX_IDLE_PER_PEER = 16

if TYPE_CHECKING:
    from .tls import ClientTLS, Expected

_ids = itertools.count(1)

#: Seconds by which a connection's deadline may come early.
_SLACK = 1e-4

#: A peer address and the TLS peer expected there: what pooled connections are kept by.
_Key = tuple[Address, "Expected | None"]
#: An HTTP response: its status and its body.
_Response = tuple[int, bytes]


class _Closed(Exception):
    """The connection ended before a whole response arrived."""


class _TooLarge(Exception):
    """The response body grew past :data:`MAX_RESPONSE`."""


class _HTTPConnection(protocol.Protocol):
    """
    One HTTP/1.1 connection to a peer, carrying one request at a time.

    It has one timer, for whichever deadline it is under: its call's timeout while a
    request is in flight (the call then fails and the connection is aborted), the
    pool's idle time while it waits in the pool (it is then closed).  Moving a deadline
    later, what every call and every release does, touches no timer: the timer fires
    at the earlier deadline, finds the later one and waits again.

    :ivar done: while a request is in flight, the Deferred of its (status, body)
    """

    done: defer.Deferred[_Response] | None = None
    lost = False
    #: Over TLS, ``(identity, serial, not_before)`` of the peer's certificate, once read.
    peer: tuple[Any, int, float] | None = None
    _timer: IDelayedCall | None = None
    # Connected over TCP, Unix or TLS: all of them can be aborted.
    transport: ITCPTransport

    def __init__(self, pool: _Pool, address: Address, key: _Key) -> None:
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

    def request(self, body: bytes, timeout: float) -> defer.Deferred[_Response]:
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

    def _cancel(self, d: defer.Deferred[_Response]) -> None:
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
            self._fail(
                BadResponse(
                    self.address,
                    f"response body larger than {self._pool.max_response} bytes",
                )
            )
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
                d.errback(_Closed())


class _Pool:
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
        self._idle: dict[_Key, list[_HTTPConnection]] = {}
        self._all: set[_HTTPConnection] = set()
        self._closing: list[defer.Deferred[None]] = []
        self._closed = False
        self.max_response = MAX_RESPONSE
        #: Connections made before the last retire() are not reused (old TLS material).
        self.generation = 0

    def take(self, key: _Key) -> _HTTPConnection | None:
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

    def _still_trusted(self, conn: _HTTPConnection) -> bool:
        tls = self._tls
        if tls is None or tls.peer_check is None:
            return True
        if conn.peer is None:
            conn.peer = tls.peer_of(conn.transport)
        return conn.peer is not None and tls.accepts(*conn.peer)

    def get(
        self, address: Address, expect: Expected | None = None
    ) -> defer.Deferred[_HTTPConnection]:
        """
        :param address: an :class:`.Address`
        :param expect: over TLS, the :class:`~hero_compute.rpc.tls.Expected` peer; a
            connection verified for one peer is never reused for another
        :return: a Deferred of a connected :class:`_HTTPConnection` to ``address``
        """
        conn = self.take((address, expect))
        if conn is not None:
            return defer.succeed(conn)
        return self.connect(address, expect)

    def connect(
        self, address: Address, expect: Expected | None = None
    ) -> defer.Deferred[_HTTPConnection]:
        """
        :return: a Deferred of a new :class:`_HTTPConnection` to ``address``
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
        factory.protocol = lambda: _HTTPConnection(self, address, key)
        # The factory makes nothing but _HTTPConnection.
        d = cast("defer.Deferred[_HTTPConnection]", endpoint.connect(factory))
        d.addCallback(self._track)
        return d

    def _track(self, conn: _HTTPConnection) -> _HTTPConnection:
        self._all.add(conn)
        return conn

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

    def release(self, conn: _HTTPConnection) -> None:
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

    def forget(self, conn: _HTTPConnection) -> None:
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


class RpcClient:
    """
    Calls JSON-RPC methods on peers named by address URI.

    :param reactor: the reactor
    :param timeout: default seconds allowed for a whole call (connect included)
    :param connect_timeout: seconds allowed to establish a connection, so that a dead
        peer fails fast even when calls may legitimately take long
    :param max_per_peer: idle persistent connections kept per peer
    :param max_response: bytes of a response body beyond which the call fails
    :param tls: a :class:`~hero_compute.rpc.tls.ClientTLS` for ``tls://`` peers (our
        certificate and the fleet CA), or None: ``tls://`` peers are then refused
    """

    def __init__(
        self,
        reactor: Any,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        max_per_peer: int = MAX_IDLE_PER_PEER,
        tls: ClientTLS | None = None,
        max_response: int = MAX_RESPONSE,
    ) -> None:
        self._reactor = reactor
        self.timeout = timeout
        self.tls = tls
        self._pool = _Pool(reactor, connect_timeout, max_per_peer, tls)
        # A peer's answer is read whole before it is parsed: never more than this.
        self._pool.max_response = max_response

    def use_tls(self, tls: ClientTLS) -> None:
        """
        Reach ``tls://`` peers with this material from now on (it arrives when the
        service starts, after the client was built).

        :param tls: a :class:`~hero_compute.rpc.tls.ClientTLS`
        """
        self.tls = self._pool._tls = tls
        self._pool.retire()

    def retire_connections(self) -> None:
        """New calls use new connections (e.g. after our TLS material was reloaded)."""
        self._pool.retire()

    def call(
        self,
        address: Address | str,
        method: str,
        params: Any = None,
        timeout: float | None = None,
        expect: Expected | None = None,
    ) -> defer.Deferred[Any]:
        """
        Call a method and wait for its result.

        :param address: an :class:`.Address` or address URI
        :param method: the method name
        :param params: a dict (by name), a list (by position) or None
        :param timeout: seconds for this call; the client's default when None
        :param expect: over TLS, the :class:`~hero_compute.rpc.tls.Expected` peer (the
            handshake fails, before anything is sent, unless the peer's certificate
            names it); None: the client's own expectation
        :return: a Deferred firing with the result, or failing with :class:`.RpcError`
            or a :class:`.TransportError`
        """
        return self._send(address, method, params, next(_ids), timeout, expect)

    def notify(
        self,
        address: Address | str,
        method: str,
        params: Any = None,
        timeout: float | None = None,
        expect: Expected | None = None,
    ) -> defer.Deferred[None]:
        """
        Send a notification: the peer runs the method and answers nothing.

        :return: a Deferred firing with None once the peer has acknowledged it
        """
        return self._send(address, method, params, None, timeout, expect)

    def _send(
        self,
        address: Address | str,
        method: str,
        params: Any,
        rid: int | None,
        timeout: float | None,
        expect: Expected | None,
    ) -> defer.Deferred[Any]:
        """A request (``rid`` an int: fires with its result) or a notification."""
        try:
            # Parsed here too: a BadResponse names the Address, as every other failure.
            address = parse_address(address)
        except AddressError as e:
            return defer.fail(e)
        if timeout is None:
            timeout = self.timeout
        d = self._post(address, _message(method, params, rid), timeout, expect)
        return d.addCallbacks(
            _acknowledged if rid is None else _result_of,
            _transport_failure,
            callbackArgs=(address,),
            errbackArgs=(address, timeout),
        )

    def local_host(
        self, address: Address | str, timeout: float | None = None
    ) -> defer.Deferred[str]:
        """
        Our own IP address on a connection to a peer (a pooled one, or a new one left in
        the pool for the next call).

        :param address: an :class:`.Address` or address URI, tcp or tls
        :return: a Deferred firing with the address, as text
        """
        try:
            address = parse_address(address)
        except AddressError as e:
            return defer.fail(e)
        if address.is_unix:
            return defer.fail(
                ValueError(f"{address.uri}: a Unix socket has no host address")
            )
        timeout = self.timeout if timeout is None else timeout

        def read(conn: _HTTPConnection) -> str:
            host = conn.transport.getHost().host
            self._pool.release(conn)
            return host

        d = self._pool.get(address).addCallback(read)
        d.addTimeout(timeout, self._reactor)
        d.addErrback(_transport_failure, address, timeout)
        return d

    def _post(
        self,
        address: Address,
        body: bytes,
        timeout: float,
        expect: Expected | None = None,
    ) -> defer.Deferred[_Response]:
        """
        POST ``body`` over a pooled connection, or a new one.

        :return: a Deferred of the ``(status, body)`` of the response, failing as the
            transport did (:func:`_transport_failure` says what that means)
        """
        conn = self._pool.take((address, expect))
        if conn is not None:
            return conn.request(body, timeout)
        # Connecting counts against the call's time, and what is left is the request's.
        deadline = self._reactor.seconds() + timeout
        d = self._pool.connect(address, expect)
        d.addTimeout(timeout, self._reactor)
        return d.addCallback(self._request_on, body, deadline)

    def _request_on(
        self, conn: _HTTPConnection, body: bytes, deadline: float
    ) -> defer.Deferred[_Response]:
        return conn.request(body, max(deadline - self._reactor.seconds(), 0.0))

    def close(self) -> defer.Deferred[None]:
        """
        Close the pooled connections.

        :return: a Deferred firing when they are closed
        """
        return self._pool.close()


#: Request bodies: ASCII (non-ASCII escaped), and NaN written as ``json`` always has.
_encode = json.JSONEncoder(separators=(",", ":")).encode


def _message(method: str, params: Any, rid: int | None) -> bytes:
    """The body of a request (``rid`` an int) or a notification (``rid`` None)."""
    head = b'{"jsonrpc":"2.0","method":%s' % _encode(method).encode("ascii")
    if params is not None:
        head += b',"params":%s' % _encode(params).encode("ascii")
    if rid is None:
        return head + b"}"
    return head + b',"id":%d}' % rid


def _read(response: _Response, address: Address) -> Any:
    """:return: the parsed body of a response, None for 204; or BadResponse"""
    status, body = response
    if status == 204:
        return None
    if status != 200:
        # Never a byte of what answered: it may be another service the address was
        # aimed at (CONTRACT §6).  Its status and size are enough to tell what happened.
        raise BadResponse(address, f"HTTP {status} with a {len(body)}-byte body")
    try:
        # Strict: NaN, Infinity or 1e400 make it no JSON-RPC reply (CONTRACT §7).
        return loads(body)
    except (ValueError, RecursionError):
        raise BadResponse(
            address, f"the response is not JSON ({len(body)} bytes)"
        ) from None


def _acknowledged(response: _Response, address: Address) -> None:
    _read(response, address)


def _result_of(response: _Response, address: Address) -> Any:
    """:return: the result of a JSON-RPC response; or RpcError, or BadResponse"""
    message = _read(response, address)
    if not isinstance(message, dict):
        raise BadResponse(address, "the response is not a JSON-RPC response object")
    if "error" in message:
        error = message["error"]
        if not isinstance(error, dict):
            raise BadResponse(address, "the error member is not an object")
        raise RpcError.from_wire(error)
    if "result" not in message:
        raise BadResponse(address, "the response has neither result nor error")
    return message["result"]


def _transport_failure(failure: Failure, address: Address, timeout: float) -> Failure:
    if failure.check(
        RpcError, BadResponse, ConnectionRefused, CallTimedOut, ConnectionClosed
    ):
        return failure
    if failure.check(ierror.TimeoutError, ierror.ConnectingCancelledError):
        # Still connecting: the request never left, so a caller may try elsewhere.
        raise ConnectTimedOut(address, f"no connection within {timeout:g} s")
    if failure.check(defer.TimeoutError, defer.CancelledError):
        raise CallTimedOut(address, f"no response within {timeout:g} s")
    if failure.check(ierror.ConnectError, ierror.DNSLookupError):
        raise ConnectionRefused(address, f"cannot connect: {failure.getErrorMessage()}")
    if failure.check(_Closed, ierror.ConnectionLost, ierror.ConnectionDone):
        raise ConnectionClosed(address, "the connection closed before the response")
    return failure
