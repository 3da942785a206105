"""
The JSON-RPC client: calls any address URI (unix, tcp, tls) over a pool of persistent
HTTP/1.1 connections, with a per-call timeout.

Failures come out as one of two families: L{RpcError} when the peer answered with a
JSON-RPC error object (same code, message and data), or a L{TransportError} subclass when
no JSON-RPC answer came (refused, timed out, closed mid-call, not JSON-RPC).
"""

import itertools
import json

from twisted.internet import defer, error as ierror, protocol
from twisted.web.http import PotentialDataLoss
from twisted.web import client as wclient
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from .addresses import AddressError, parse_address
from .errors import (
    BadResponse,
    CallTimedOut,
    ConnectionClosed,
    ConnectionRefused,
    RpcError,
)

#: Responses larger than this are refused, so a misbehaving peer cannot make us buffer
#: without bound (a proxied result passes through the explorer's memory).
MAX_RESPONSE = 16 * 1024 * 1024

#: Seconds a pooled idle connection is kept; below the server's idle timeout so that
#: it is the client that closes, never the server under a request being sent.
POOL_IDLE = 50

_HEADERS = Headers({b"content-type": [b"application/json"], b"user-agent": [b"hero_compute"]})
_ids = itertools.count(1)


class _QuietFactory(wclient._HTTP11ClientFactory):
    # Twisted logs "Starting factory" for every new pooled connection; at fleet scale
    # that is most of the log.
    noisy = False


@implementer(IBodyProducer)
class _Body:
    """A request body that is already all in memory."""

    def __init__(self, data):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    Maps the synthetic host names of our request URLs back to addresses, so that one
    L{Agent} and one pool serve Unix and TCP peers alike, one pool key per address.
    """

    def __init__(self, reactor, connect_timeout):
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._by_host = {}
        self._urls = {}

    def url_for(self, address):
        url = self._urls.get(address)
        if url is None:
            host = b"peer%d.hero-compute.invalid" % len(self._urls)
            self._by_host[host] = address
            url = self._urls[address] = b"http://" + host + b"/rpc"
        return url

    def endpointForURI(self, uri):
        return self._by_host[uri.host].client_endpoint(self._reactor, self._connect_timeout)


class RpcClient:
    """
    Calls JSON-RPC methods on peers named by address URI.

    :param reactor: the reactor
    :param timeout: default seconds allowed for a whole call (connect included)
    :param connect_timeout: seconds allowed to establish a connection, so that a dead
        peer fails fast even when calls may legitimately take long
    :param max_per_peer: persistent connections kept per peer
    """

    def __init__(self, reactor, timeout=10.0, connect_timeout=5.0, max_per_peer=4):
        self._reactor = reactor
        self.timeout = timeout
        self._pool = wclient.HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_per_peer
        self._pool.cachedConnectionTimeout = POOL_IDLE
        self._pool.retryAutomatically = False
        self._pool._factory = _QuietFactory
        self._endpoints = _Endpoints(reactor, connect_timeout)
        self._agent = wclient.Agent.usingEndpointFactory(reactor, self._endpoints, pool=self._pool)

    def call(self, address, method, params=None, timeout=None):
        """
        Call a method and wait for its result.

        :param address: an L{Address} or address URI
        :param method: the method name
        :param params: a dict (by name), a list (by position) or None
        :param timeout: seconds for this call; the client's default when None
        :return: a Deferred firing with the result, or failing with L{RpcError} or a
            L{TransportError}
        """
        message = {"jsonrpc": "2.0", "method": method, "id": next(_ids)}
        if params is not None:
            message["params"] = params
        d = self._post(address, message, timeout)
        d.addCallback(_result_of, address)
        return d

    def notify(self, address, method, params=None, timeout=None):
        """
        Send a notification: the peer runs the method and answers nothing.

        :return: a Deferred firing with None once the peer has acknowledged it
        """
        message = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        return self._post(address, message, timeout).addCallback(lambda _: None)

    def _post(self, address, message, timeout):
        try:
            address = parse_address(address)
        except AddressError as e:
            return defer.fail(e)
        timeout = self.timeout if timeout is None else timeout
        body = json.dumps(message, separators=(",", ":")).encode("utf-8")
        d = self._agent.request(
            b"POST", self._endpoints.url_for(address), _HEADERS, _Body(body)
        )
        d.addCallback(_read, address)
        d.addTimeout(timeout, self._reactor)
        d.addErrback(_transport_failure, address, timeout)
        return d

    def close(self):
        """
        Close the pooled connections.

        :return: a Deferred firing when they are closed
        """
        return self._pool.closeCachedConnections()


class _BodyReader(protocol.Protocol):
    """
    Collects a response body, up to L{MAX_RESPONSE} bytes.  Twisted's C{readBody}
    cannot abort a body still arriving on our transports when its Deferred is cancelled
    (as a timeout does); this one stops the transport.
    """

    def __init__(self, address):
        self._address = address
        self._chunks = []
        self._size = 0
        self.done = defer.Deferred(lambda _: self.transport.stopProducing())

    def dataReceived(self, data):
        self._size += len(data)
        if self._size > MAX_RESPONSE:
            self._chunks = []
            self.transport.stopProducing()
            if not self.done.called:
                self.done.errback(BadResponse(
                    self._address, f"response body larger than {MAX_RESPONSE} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason=protocol.connectionDone):
        if self.done.called:
            return
        if reason.check(wclient.ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def _read_body(response, address):
    reader = _BodyReader(address)
    response.deliverBody(reader)
    return reader.done


def _read(response, address):
    if response.code == 204:
        return _read_body(response, address).addCallback(lambda _: None)
    if response.code != 200:
        d = _read_body(response, address)

        def fail(body):
            raise BadResponse(address, f"HTTP {response.code}: {body[:200]!r}")

        return d.addCallback(fail)
    return _read_body(response, address).addCallback(_parse, address)


def _parse(body, address):
    try:
        return json.loads(body)
    except ValueError:
        raise BadResponse(address, f"the response is not JSON: {body[:200]!r}")


def _result_of(message, address):
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


def _transport_failure(failure, address, timeout):
    if failure.check(RpcError, BadResponse, ConnectionRefused, CallTimedOut, ConnectionClosed):
        return failure
    if failure.check(defer.TimeoutError, ierror.TimeoutError):
        raise CallTimedOut(address, f"no response within {timeout:g} s")
    if failure.check(ierror.ConnectError, ierror.DNSLookupError):
        raise ConnectionRefused(address, f"cannot connect: {failure.getErrorMessage()}")
    if failure.check(wclient.ResponseNeverReceived, wclient.RequestTransmissionFailed,
                     wclient.ResponseFailed, ierror.ConnectionLost, ierror.ConnectionDone):
        reasons = getattr(failure.value, "reasons", None) or [failure]
        if any(r.check(defer.CancelledError) for r in reasons):
            raise CallTimedOut(address, f"no response within {timeout:g} s")
        raise ConnectionClosed(address, "the connection closed before the response")
    return failure
