"""
Admission of connections under hostile load (CONTRACT §7), at accept, on every TCP-based
listener of a process: its JSON-RPC listeners (TCP and mutual TLS), the dashboard and
the metrics page.

An :class:`Admission` per group of listeners counts the open connections per peer
address, and all of them keep :attr:`~hero_compute.rpc.limits.Limits.fd_reserve`
descriptors of the process free for the Unix socket (the operator's way in); a refused
connection is closed at accept, before any byte is read and before a TLS handshake is
begun.  A connection is counted once, by the outermost protocol of its stack:
:class:`~hero_compute.rpc.http_server.RpcHTTPFactory` for plain TCP and Unix,
:class:`AdmittedTLSFactory` in front of TLS, :class:`AdmittedSite` for ``twisted.web``
sites.

The head deadline (``HERO_HEAD_TIMEOUT``): over TLS the handshake must end within it,
counted from accept (a peer that never starts it, or stalls inside its ClientHello, is
cut off then); each request head then has its own deadline from its first byte, in the
HTTP layer (:class:`~hero_compute.rpc.http_server.RpcHTTPProtocol`, or
:class:`HeadDeadlineChannel` for ``twisted.web``).
"""

from __future__ import annotations

import collections
import os
import resource
from typing import Any, Protocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

from .limits import Limits
from .throttle import REFUSALS_EVERY, Throttle
from .tls_server import TLSServerFactory, TLSServerProtocol

log = Logger()

#: A refusal of one limit is logged at most once per this many seconds.
LOG_EVERY = REFUSALS_EVERY

#: The answer to a head that did not arrive in time.
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
)


def peer_host(addr: IAddress | None) -> str | None:
    """
    :param addr: the peer address a factory is given at accept
    :return: the peer's IP address for TCP (and TLS over it), None for Unix sockets
    """
    return addr.host if isinstance(addr, (IPv4Address, IPv6Address)) else None


class Descriptors:
    """
    The file descriptors of the process, for the reserve kept for the Unix socket.

    :ivar open: connections open in all, on every listener, Unix ones included
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.open = 0
        self._limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        # Descriptors in use besides our connections, as last counted (and when).
        self._in_use = 0
        self._counted_at = float("-inf")

    def short(self, reserve: int) -> bool:
        """:return: whether one more connection would eat into ``reserve``"""
        if self._limit <= 0 or self.open + 4 * reserve < self._limit:
            return False  # far from the limit: no system call on the hot path
        # Near it, count what is really open (outgoing connections and files too), but
        # at most twice a second: listing 20,000 descriptors per accept would stall us.
        now = self.clock.seconds()
        if now - self._counted_at > 0.5:
            try:
                self._in_use = len(os.listdir("/proc/self/fd")) - self.open
            except OSError:
                return False
            self._counted_at = now
        return self._in_use + self.open + reserve >= self._limit


class Admission:
    """
    The connections of one group of listeners (the JSON-RPC ones, the dashboard, the
    metrics page), counted at accept and refused beyond the limits: per peer address
    within the group, and the descriptor reserve across the whole process (see
    :meth:`sibling`).

    :param limits: the :class:`~hero_compute.rpc.limits.Limits`
    :param clock: the reactor, for the head deadline and the rate of refusal lines
    :ivar refusals: refusals by limit, for metrics (shared by the siblings)
    :ivar per_host: open TCP/TLS connections of the group per peer address (Unix ones
        are not counted)
    :ivar open: open connections of the group, Unix ones included
    """

    def __init__(
        self, limits: Limits | None = None, clock: IReactorTime | None = None
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.limits = limits or Limits()
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self.refusals: collections.Counter[str] = collections.Counter()
        self.per_host: collections.Counter[str] = collections.Counter()
        self.open = 0
        self.descriptors = Descriptors(self.clock)
        # One refusal line per limit per LOG_EVERY, the others counted into the next.
        self._log = Throttle(self.clock, LOG_EVERY)

    def sibling(self) -> Admission:
        """
        The admission of another group of listeners of this process: its own count per
        address (a dashboard stays open to the operator however many connections a
        fleet behind one address holds), the same descriptors, refusal counts and log.
        """
        other = Admission(self.limits, self.clock)
        other.refusals, other.descriptors = self.refusals, self.descriptors
        other._log = self._log
        return other

    def admit(self, host: str | None) -> bool:
        """
        A connection was accepted: count it, or refuse it (and count the refusal).

        :param host: the peer's address (:func:`peer_host`), None for a Unix socket
        :return: whether it may go on; if so, :meth:`release` it when it is lost
        """
        if host is not None:
            if self.per_host[host] >= self.limits.max_conns_per_addr:
                self.refused("max_conns_per_addr", None, host)
                return False
            if self.descriptors.short(self.limits.fd_reserve):
                # The Unix socket is how the operator gets in to see what is wrong: TCP
                # gives way while the descriptors kept for it would be used.
                self.refused("fd_reserve", None, host)
                return False
            self.per_host[host] += 1
        self.open += 1
        self.descriptors.open += 1
        return True

    def release(self, host: str | None) -> None:
        """
        An admitted connection is gone.

        :param host: what it was admitted with
        """
        self.open -= 1
        self.descriptors.open -= 1
        if host is not None:
            left = self.per_host[host] - 1
            if left > 0:
                self.per_host[host] = left
            else:
                del self.per_host[host]

    def refused(self, limit: str, transport: Any, host: str | None = None) -> None:
        """
        Count a refusal, and log it at most once per limit every :data:`LOG_EVERY`
        seconds (with how many more there were): a flood of refusals must not become a
        flood of logs.

        :param limit: the limit's name, as in metrics
        :param transport: the connection's transport, to name its peer; or None
        :param host: the peer's address, when there is no transport yet
        """
        self.refusals[limit] += 1
        if host is None and transport is not None:
            host = getattr(transport.getPeer(), "host", "unix")
        more = self._log.offer(limit)
        if more is None:
            return
        log.warn(
            "refused ({limit}) a connection from {host}{more}",
            limit=limit,
            host=host,
            more=f" (and {more} more since the last such line)" if more else "",
        )


class _Builds(Protocol):
    def buildProtocol(self, addr: IAddress) -> Any: ...


def _build_admitted(factory: _Builds, addr: IAddress) -> Any:
    """The protocol of ``factory`` for a connection admitted in front of it."""
    build = getattr(factory, "build_admitted", None)
    return factory.buildProtocol(addr) if build is None else build(addr)


class AdmittedTLS(TLSServerProtocol):
    """
    Our TLS transport, for a connection admitted at accept: it releases the admission
    when lost, and is cut off if its handshake has not ended within the head deadline.
    """

    factory: AdmittedTLSFactory
    # A TCP transport (abortConnection), which ITransport does not name.
    transport: Any
    _host: str | None = None
    _deadline: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        admission = self.factory.admission
        self._deadline = admission.clock.callLater(
            admission.limits.head_timeout, self._handshake_too_slow
        )
        TLSServerProtocol.makeConnection(self, transport)

    def _handshake_ended(self) -> None:
        self._stop_deadline()

    def _handshake_too_slow(self) -> None:
        self._deadline = None
        self.factory.admission.refused("head_timeout", self.transport)
        # Nothing of HTTP can be said before the handshake: just cut it off.
        self.transport.abortConnection()

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        self.factory.admission.release(self._host)
        TLSServerProtocol.connectionLost(self, reason)


class AdmittedTLSFactory(TLSServerFactory):
    """
    Mutual TLS in front of ``factory``, with :class:`Admission` applied at accept,
    before the TLS layer.

    :param creator: a :class:`~hero_compute.rpc.tls.ServerTLS`
    :param factory: the application's protocol factory
    :param admission: the process's :class:`Admission`
    """

    protocol = AdmittedTLS

    def __init__(self, creator: Any, factory: Factory, admission: Admission) -> None:
        TLSServerFactory.__init__(self, creator, factory)
        self.admission = admission

    def buildProtocol(self, addr: IAddress) -> AdmittedTLS | None:  # type: ignore[override]  # None refuses, as Twisted allows
        host = peer_host(addr)
        if not self.admission.admit(host):
            return None
        proto = AdmittedTLS(self, _build_admitted(self.wrappedFactory, addr))
        proto._host = host
        return proto


class HeadDeadlineChannel(http.HTTPChannel):  # type: ignore[misc]  # HTTPChannel's bases are untyped
    """
    ``twisted.web``'s connection, with a deadline on each request head (408 and close
    beyond it: the idle timeout alone is reset by every byte of a trickled head), and
    the release of its admission when lost (unless a TLS layer in front counted it).
    """

    transport: Any
    _admission: Admission | None = None
    _host: str | None = None
    _counted = False
    _head_timer: IDelayedCall | None = None
    _in_head = True

    def _arm(self) -> None:
        admission = self._admission
        if admission is not None:
            self._head_timer = admission.clock.callLater(
                admission.limits.head_timeout, self._head_too_slow
            )

    def dataReceived(self, data: bytes) -> None:
        # Armed by the first byte of a head, as on the JSON-RPC listeners (a silent
        # connection is the idle timeout's; behind TLS, the handshake is AdmittedTLS's).
        if self._in_head and self._head_timer is None:
            self._arm()
        http.HTTPChannel.dataReceived(self, data)

    def allHeadersReceived(self) -> None:
        self._in_head = False
        self._stop()
        http.HTTPChannel.allHeadersReceived(self)

    def allContentReceived(self) -> None:
        # What comes next is the next request's head.
        self._in_head = True
        http.HTTPChannel.allContentReceived(self)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        assert self._admission is not None
        self._admission.refused("head_timeout", self.transport)
        body = b"request head not complete in time\n"
        self.transport.write(_REQUEST_TIMEOUT % (len(body), body))
        self.transport.loseConnection()

    def _stop(self) -> None:
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop()
        if self._counted:
            assert self._admission is not None
            self._admission.release(self._host)
        http.HTTPChannel.connectionLost(self, reason)


class AdmittedSite(server.Site):
    """
    A ``twisted.web`` site whose connections are admitted at accept and whose request
    heads have a deadline (both when given an :class:`Admission` in ``admission``).
    """

    # Not Twisted's HTTP/2-capable wrapper: we offer no ALPN, so it would be HTTP/1.1.
    protocol = HeadDeadlineChannel  # type: ignore[assignment]
    admission: Admission | None = None

    def buildProtocol(self, addr: IAddress) -> HeadDeadlineChannel | None:  # type: ignore[override]  # None refuses, as Twisted allows
        admission = self.admission
        host = peer_host(addr)
        if admission is not None and not admission.admit(host):
            return None
        channel = self.build_admitted(addr)
        channel._host, channel._counted = host, admission is not None
        return channel

    def build_admitted(self, addr: IAddress) -> HeadDeadlineChannel:
        """
        A connection admitted in front of the site (by TLS): it counts nothing itself.

        :param addr: the peer's address
        """
        channel = server.Site.buildProtocol(self, addr)
        assert isinstance(channel, HeadDeadlineChannel)
        channel._admission = self.admission
        return channel
