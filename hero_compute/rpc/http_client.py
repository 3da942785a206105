"""
The JSON-RPC client: calls any address URI (unix, tcp, tls) over a pool of persistent
HTTP/1.1 connections, with a per-call timeout.

Failures come out as one of two families: :class:`.RpcError` when the peer answered
with a JSON-RPC error object (same code, message and data), or a
:class:`.TransportError` subclass when no JSON-RPC answer came (refused, timed out,
closed mid-call, not JSON-RPC).

The connections and their pool are :mod:`~hero_compute.rpc.http_pool` (HTTP/1.1
through ``httptools`` rather than ``twisted.web``'s Agent: the explorer's proxy spent
most of its time there, see the README's performance section); bodies are read and
written by :mod:`~hero_compute.rpc.codec`.
"""

from __future__ import annotations

import functools
import itertools
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet import error as ierror
from twisted.python.failure import Failure
from zope.interface import implementer

from .addresses import Address, AddressError, parse_address
from .codec import Parsed, dumps_request, loads_result
from .errors import (
    BadResponse,
    CallTimedOut,
    ConnectionClosed,
    ConnectionRefused,
    ConnectTimedOut,
    InvalidParams,
    RpcError,
)
from .http_pool import (
    MAX_IDLE_PER_PEER,
    MAX_RESPONSE,
    POOL_IDLE,
    Closed,
    HTTPConnection,
    Pool,
    Response,
)
from .interfaces import IRpcClient

if TYPE_CHECKING:
    from .tls import ClientTLS, Expected

__all__ = ["MAX_IDLE_PER_PEER", "MAX_RESPONSE", "POOL_IDLE", "RpcClient"]

_ids = itertools.count(1)


@implementer(IRpcClient)
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
    :param relay: results that are objects come back as
        :class:`~hero_compute.rpc.codec.Parsed` where ``orjson`` read them (the
        explorer's proxy, which passes them on as they came); plain dicts otherwise
    """

    def __init__(
        self,
        reactor: Any,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        max_per_peer: int = MAX_IDLE_PER_PEER,
        tls: ClientTLS | None = None,
        max_response: int = MAX_RESPONSE,
        relay: bool = False,
    ) -> None:
        self._reactor = reactor
        self._result_of = _relayed_result_of if relay else _result_of
        self.timeout = timeout
        self.tls = tls
        self._pool = Pool(reactor, connect_timeout, max_per_peer, tls)
        # A peer's answer is read whole before it is parsed: never more than this.
        self._pool.max_response = max_response

    def use_tls(self, tls: ClientTLS) -> None:
        """
        Reach ``tls://`` peers with this material from now on (it arrives when the
        service starts, after the client was built).

        :param tls: a :class:`~hero_compute.rpc.tls.ClientTLS`
        """
        self.tls = tls
        self._pool.use_tls(tls)

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

    def relay(
        self,
        address: Address,
        method: str,
        params: Any,
        timeout: float,
        expect: Expected | None = None,
    ) -> defer.Deferred[Response]:
        """
        :meth:`call`'s request without its reading, for a caller that reads the outcome
        in a callback of its own (the explorer's proxy: one callback a call, not two).

        :param address: a parsed :class:`.Address`
        :return: a Deferred of the raw ``(status, body)``, or failing as the pool did;
            :meth:`outcome` makes of either what :meth:`call` would have given
        """
        try:
            message = _message(method, params, next(_ids))
        except InvalidParams as e:
            return defer.fail(e)
        return self._post(address, message, timeout, expect)

    def outcome(self, raw: Response | Failure, address: Address, timeout: float) -> Any:
        """
        :param raw: what a :meth:`relay` Deferred gave
        :param address: the address it was sent to
        :param timeout: the seconds it was allowed
        :return: the call's result, as :meth:`call` gives it
        :raise RpcError: the peer's error; or the :class:`.TransportError` that
            :meth:`call` would have failed with
        """
        if isinstance(raw, Failure):
            _transport_failure(raw, address, timeout).raiseException()
        return self._result_of(raw, address)

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
        try:
            message = _message(method, params, rid)
        except InvalidParams as e:
            return defer.fail(e)
        d = self._post(address, message, timeout, expect)
        return d.addCallbacks(
            _acknowledged if rid is None else self._result_of,
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

        def read(conn: HTTPConnection) -> str:
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
    ) -> defer.Deferred[Response]:
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
        self, conn: HTTPConnection, body: bytes, deadline: float
    ) -> defer.Deferred[Response]:
        return conn.request(body, max(deadline - self._reactor.seconds(), 0.0))

    def close(self) -> defer.Deferred[None]:
        """
        Close the pooled connections.

        :return: a Deferred firing when they are closed
        """
        return self._pool.close()


#: Method names at most this long have their request head cached: a proxied method
#: name comes from the caller, and 256 long ones must not hold a gigabyte.
_CACHED_NAME = 64


def _message(method: str, params: Any, rid: int | None) -> bytes:
    """
    The body of a request (``rid`` an int) or a notification (``rid`` None).

    :raise InvalidParams: when ``params`` nest deeper than the encoder goes (orjson,
        which may have read them from a caller, allows more)
    """
    if len(method) <= _CACHED_NAME:
        head = _request_head(method)
    else:
        head = b'{"jsonrpc":"2.0","method":%s' % dumps_request(method)
    if params is not None:
        try:
            head += b',"params":%s' % dumps_request(params)
        except RecursionError:
            raise InvalidParams("params cannot be encoded: nested too deeply") from None
    if rid is None:
        return head + b"}"
    return head + b',"id":%d}' % rid


@functools.lru_cache(maxsize=256)
def _request_head(method: str) -> bytes:
    """A request's first members: the same few method names come again and again (a
    cached hit is one C call, the encoder two Python ones)."""
    return b'{"jsonrpc":"2.0","method":%s' % dumps_request(method)


def _read(response: Response, address: Address) -> Any:
    """:return: the parsed body of a response, None for 204; or BadResponse"""
    return _parse(response, address)[0]


def _parse(response: Response, address: Address) -> tuple[Any, bool]:
    """
    :return: the parsed body of a response (None for 204), and whether
        :func:`~hero_compute.rpc.codec.loads_result` found it plain; or BadResponse
    """
    status, body = response
    if status == 204:
        return None, True
    if status != 200:
        # Never a byte of what answered: it may be another service the address was
        # aimed at (CONTRACT §6).  Its status and size are enough to tell what happened.
        raise BadResponse(address, f"HTTP {status} with a {len(body)}-byte body")
    try:
        # Strict: NaN, Infinity or 1e400 make it no JSON-RPC reply (CONTRACT §7).
        return loads_result(body)
    except (ValueError, RecursionError):
        raise BadResponse(
            address, f"the response is not JSON ({len(body)} bytes)"
        ) from None


def _acknowledged(response: Response, address: Address) -> None:
    _read(response, address)


def _result_of(response: Response, address: Address) -> Any:
    """:return: the result of a JSON-RPC response; or RpcError, or BadResponse"""
    result, _ = _result_and_plain(response, address)
    return result


def _relayed_result_of(response: Response, address: Address) -> Any:
    """
    :func:`_result_of`, an object ``orjson`` read coming back as a
    :class:`~hero_compute.rpc.codec.Parsed`: the explorer's answer writes it again
    without walking it for NaNs.
    """
    result, plain = _result_and_plain(response, address)
    return Parsed(result) if plain and type(result) is dict else result


def _result_and_plain(response: Response, address: Address) -> tuple[Any, bool]:
    message, plain = _parse(response, address)
    if not isinstance(message, dict):
        raise BadResponse(address, "the response is not a JSON-RPC response object")
    if "error" in message:
        error = message["error"]
        if not isinstance(error, dict):
            raise BadResponse(address, "the error member is not an object")
        raise RpcError.from_wire(error)
    if "result" not in message:
        raise BadResponse(address, "the response has neither result nor error")
    return message["result"], plain


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
    if failure.check(Closed, ierror.ConnectionLost, ierror.ConnectionDone):
        raise ConnectionClosed(address, "the connection closed before the response")
    return failure
