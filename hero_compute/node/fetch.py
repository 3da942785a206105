"""
One download for ``image.import``: an ``http(s)://`` URL streamed into a file, hashed as
it arrives, bounded in size, in idle time, in rate and in the time to the response head,
with the proxy's address policy.

Every connection, the first and each redirect's, goes through :class:`CheckedEndpoints`:
the host is resolved, every address it resolves to is checked against
:func:`refused_target` (unless local fetches are allowed), and the connection goes to
the very address that was checked, so a name that resolves to ``127.0.0.1`` or
``169.254.169.254`` (at once, or only on the second lookup) never
turns the node into a way into its own host or its cloud's metadata service.

The body goes to a :class:`~hero_compute.node.sink.BodySink`.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, threads
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RedirectAgent,
    ResponseNeverReceived,
)
from twisted.web.error import InfiniteRedirection, SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory
from zope.interface import implementer

import hero_compute
from hero_compute.rpc.addresses import forbidden_target
from hero_compute.rpc.errors import InvalidVmState

from .fetch_errors import FetchError, RefusedTarget
from .sink import BodySink, TempFile

if TYPE_CHECKING:
    from twisted.web.client import URI


__all__ = [
    "Download",
    "FetchError",
    "RefusedTarget",
    "TempFile",
    "check_target",
    "check_url",
    "refused_target",
]

#: Redirects followed before giving up; each target is checked like the first.
MAX_REDIRECTS = 5

#: Seconds to connect, and seconds without a byte before the download is cut.
CONNECT_TIMEOUT = 30.0
IDLE_TIMEOUT = 60.0

#: The least average rate of a body, in bytes per second over each
#: :data:`RATE_WINDOW` seconds from its start: below it the download fails "too slow"
#: (a server dripping a byte now and then is never idle, and would hold an import slot
#: for good).
MIN_RATE = 1024.0
RATE_WINDOW = 30.0

#: Seconds from the request, every redirect included, to the final response's head
#: (connections, TLS handshakes and the heads of redirects count): the body's idle and
#: rate limits start with the body, so a server that accepts and never answers, or
#: drips its head, would otherwise hold an import slot for good.
HEAD_TIMEOUT = 30.0


#: Cloud metadata services that are neither link-local nor otherwise refused by
#: :func:`~hero_compute.rpc.addresses.forbidden_target`: AWS's IMDS over IPv6 and
#: Alibaba Cloud's.  Refused to imports too (an extension of CONTRACT §8's list).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200")
)


def refused_target(host: str) -> str | None:
    """
    Why an import may not connect to ``host``, or None: the proxy's address policy
    (:func:`~hero_compute.rpc.addresses.forbidden_target`), and the known cloud
    metadata addresses of :data:`METADATA_ADDRESSES`.

    :param host: an IP address as text (names are resolved first)
    """
    reason = forbidden_target(host)
    if reason is not None:
        return reason
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    if (mapped or ip) in METADATA_ADDRESSES:
        return f"{host} is a cloud metadata address"
    return None


def _literal(host) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _getaddrinfo(host, port):
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def check_target(
    reactor: Any, host: str, port: int, allow_local: bool
) -> defer.Deferred[str]:
    """
    The address to connect to for ``host``, resolved and checked.

    :param reactor: the reactor (its thread pool resolves names)
    :param host: a name or an IP address
    :param port: the port, for the lookup
    :param allow_local: whether loopback and the other refused kinds are allowed
        (``NODE_IMAGE_FETCH_LOCAL``)
    :return: a Deferred of the IP address (text), failing with :class:`RefusedTarget`
    """
    if _literal(host):
        reason = None if allow_local else refused_target(host)
        if reason is not None:
            return defer.fail(RefusedTarget(f"refused by policy: {reason}"))
        return defer.succeed(host)

    def check(addresses):
        if not addresses:
            raise RefusedTarget(f"{host} resolves to nothing")
        if not allow_local:
            for address in addresses:
                reason = refused_target(address)
                if reason is not None:
                    kind = reason.split(" is ", 1)[1]
                    raise RefusedTarget(
                        f"refused by policy: {host} resolves to {kind} ({address})"
                    )
        return addresses[0]

    def unresolved(failure):
        failure.trap(OSError)
        raise RefusedTarget(f"{host} does not resolve: {failure.getErrorMessage()}")

    d = threads.deferToThreadPool(
        reactor, reactor.getThreadPool(), _getaddrinfo, host, port
    )
    return d.addCallbacks(check, unresolved)


def _bad_url(url, why):
    return InvalidVmState(f"bad URL {url!r}: {why}; expected http(s)://host[:port]/path")


def check_url(url: str) -> tuple[str, int]:
    """
    :param url: the URL given to ``image.import``
    :return: ``(host, port)`` to check against the address policy
    :raise InvalidVmState: -32005 for anything but a plain ``http(s)://`` URL
    """
    if not url.isascii() or not url.isprintable() or " " in url:
        raise _bad_url(url, "only printable ASCII without spaces (percent-encode the rest)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _bad_url(url, str(e)) from None
    if parts.scheme not in ("http", "https"):
        raise _bad_url(url, "the scheme must be http or https")
    if not parts.hostname:
        raise _bad_url(url, "no host")
    if parts.username is not None or parts.password is not None:
        raise _bad_url(url, "credentials in the URL are not supported")
    if port == 0:
        raise _bad_url(url, "port 0")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


@implementer(IAgentEndpointFactory)
class CheckedEndpoints:
    """
    The agent's endpoints: each connection to the address just checked.

    :param reactor: the reactor
    :param allow_local: see :func:`check_target`
    """

    def __init__(self, reactor: Any, allow_local: bool) -> None:
        self._reactor = reactor
        self._allow_local = allow_local
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> _CheckedEndpoint:
        """:return: a :class:`_CheckedEndpoint` for the URI's host and port"""
        host = uri.host.decode("ascii")
        tls = None
        if uri.scheme == b"https":
            tls = self._tls.creatorForNetloc(uri.host, uri.port)
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
        return _CheckedEndpoint(self._reactor, host, uri.port, tls, self._allow_local)


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    def __init__(self, reactor, host, port, tls, allow_local) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._tls = tls
        self._allow_local = allow_local

    def connect(self, factory):
        def to(address):
            kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint: IStreamClientEndpoint = kind(
                self._reactor, address, self._port, timeout=CONNECT_TIMEOUT
            )
            if self._tls is not None:
                endpoint = wrapClientTLS(self._tls, endpoint)
            return endpoint.connect(factory)

        d = check_target(self._reactor, self._host, self._port, self._allow_local)
        return d.addCallback(to)


def _describe(failure):
    """:return: the :class:`FetchError` for a failed request"""
    error = failure.value
    if isinstance(error, FetchError):
        return error
    if isinstance(error, ResponseNeverReceived):
        return FetchError("the server closed the connection without answering")
    if isinstance(error, InfiniteRedirection):
        return FetchError(f"more than {MAX_REDIRECTS} redirects")
    if isinstance(error, SchemeNotSupported):
        return FetchError("redirected to a URL that is not http(s)")
    reasons = getattr(error, "reasons", None)
    if reasons:
        # ResponseFailed wraps its causes: the first says what happened.
        return _describe(reasons[0])
    return FetchError(
        f"the request failed: {failure.getErrorMessage() or type(error).__name__}"
    )


class Download:
    """
    One download of ``url`` into ``file``, following at most :data:`MAX_REDIRECTS`
    redirects; it starts at once.

    :param reactor: the reactor
    :param url: the ``http(s)://`` URL, already checked for form
    :param file: an opened :class:`TempFile`
    :param limit: the most bytes allowed (``NODE_IMAGE_MAX``): checked against the
        announced length before a byte is written, and as bytes arrive
    :param allow_local: see :func:`check_target`
    :param progress: ``progress(bytes_done, bytes_total or None)``, as bytes arrive
    :param idle: seconds without a byte before the download is cut
    :param min_rate: the least average bytes per second over each ``rate_window``
        seconds of the body, or 0 for no minimum
    :param rate_window: seconds the rate is averaged over
    :param head_timeout: seconds from the request to the response head, redirects
        included, before the download fails "no response within"
    :ivar done: a Deferred firing None once every byte is written (not yet synced), or
        failing with :class:`FetchError`; never before the last write has returned
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        file: TempFile,
        *,
        limit: int,
        allow_local: bool,
        progress: Callable[[int, int | None], object],
        idle: float = IDLE_TIMEOUT,
        min_rate: float = MIN_RATE,
        rate_window: float = RATE_WINDOW,
        head_timeout: float = HEAD_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._file = file
        self._limit = limit
        self._progress = progress
        self._idle = idle
        self._min_rate = min_rate
        self._rate_window = rate_window
        self._body: BodySink | None = None
        self._aborted: FetchError | None = None
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = RedirectAgent(
            Agent.usingEndpointFactory(
                reactor, CheckedEndpoints(reactor, allow_local), pool
            ),
            redirectLimit=MAX_REDIRECTS,
        )
        agent_name = f"hero_compute/{hero_compute.__version__}".encode()
        headers = Headers({b"User-Agent": [agent_name]})
        # Armed before the request: it may fail at once, and then disarms it.
        self._head_timer = reactor.callLater(
            head_timeout, self.abort, f"no response within {head_timeout:g} s"
        )
        self._request = agent.request(b"GET", url.encode("ascii"), headers)
        d = self._request.addBoth(self._head_over)
        d.addCallback(self._received)
        self.done = d.addErrback(self._failed)

    def abort(self, reason: str) -> None:
        """Stop the download; :attr:`done` then fails with ``reason``."""
        self._aborted = FetchError(reason)
        if self._body is not None:
            self._body.abort(self._aborted)
        else:
            # Even when "called": waiting on a connection or a response, the chain is
            # paused on an inner Deferred, which cancel() reaches and aborts; on a
            # chain that has ended, cancel() does nothing.
            self._request.cancel()

    def _head_over(self, result):
        """Disarm the head's deadline, whatever ended the wait; pass ``result`` on."""
        if self._head_timer.active():
            self._head_timer.cancel()
        return result

    def _received(self, response):
        total = None if response.length is UNKNOWN_LENGTH else response.length
        body = self._body = BodySink(
            self._reactor,
            self._file,
            self._limit,
            total,
            self._progress,
            self._idle,
            self._min_rate,
            self._rate_window,
        )
        if self._aborted is not None:
            body.abort(self._aborted)
        elif response.code != 200:
            phrase = response.phrase.decode("ascii", "replace")
            body.abort(FetchError(f"HTTP {response.code} {phrase}"))
        elif total is not None and total > self._limit:
            body.abort(
                FetchError(
                    f"larger than NODE_IMAGE_MAX: the server announces {total} bytes, "
                    f"the most allowed is {self._limit}"
                )
            )
        else:
            self._progress(0, total)
        response.deliverBody(body)
        return body.done

    def _failed(self, failure):
        if self._aborted is not None:
            raise self._aborted
        raise _describe(failure)
