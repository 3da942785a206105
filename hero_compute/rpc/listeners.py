"""
Listeners: one process serves the same site on any number of Twisted server endpoint
strings (its Unix socket, TCP, TLS, systemd-passed sockets).

Each listener is a :obj:`strports.service`, so a listener that cannot bind aborts start-up
(twistd exits 1) instead of leaving a process that serves nothing.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from twisted.application import service, strports
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

if TYPE_CHECKING:
    from .addresses import ListenAddress
    from .tls import ServerTLS

log = Logger()


def unix_endpoint_string(path: str) -> str:
    """
    The server endpoint string for a Unix socket, mode 0660.

    Twisted's ``lockfile`` (on by default) keeps a ``PATH.lock`` holding our pid: a stale
    socket left by a crash is replaced on restart, while a live owner makes the bind fail.

    :param path: the absolute socket path
    """
    return f"unix:{quoteStringArgument(path)}:mode=660:lockfile=1"


def _unix_path_of(description: str) -> str | None:
    """
    The socket path of a ``unix:`` server endpoint string, or None for other kinds.
    """
    kind, _, rest = description.partition(":")
    if kind != "unix" or not rest:
        return None
    # Arguments are separated by unescaped colons; the path is the first positional
    # one, or address=.
    for arg in re.findall(r"(?:\\.|[^:\\])+", rest):
        text = re.sub(r"\\(.)", r"\1", arg)
        key, eq, value = text.partition("=")
        if not eq:
            return text
        if key == "address":
            return value
    return None


def clear_stale_socket(path: str) -> None:
    """
    Remove a Unix socket that nothing listens on any more (a crash left it), with its
    lock file, so that it cannot block a restart; a live socket is left alone, and the
    bind then fails clearly.

    Twisted's lock file alone is not enough: it judges a lock by whether its pid is
    alive, and in a container a restarted daemon often gets the very same pid.

    :param path: the socket path
    """
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        log.info("removing stale socket {path}: nothing listens on it", path=path)
        for leftover in (path, path + ".lock"):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
    except OSError:
        pass
    finally:
        probe.close()


def describe(host: IAddress, tls: bool = False) -> str:
    """
    An address URI for a bound listening port.

    :param host: the result of ``port.getHost()``
    :param tls: whether the listener speaks TLS
    """
    if isinstance(host, UNIXAddress):
        name = host.name.decode() if isinstance(host.name, bytes) else host.name
        return f"unix://{name}"
    scheme = "tls" if tls else "tcp"
    if isinstance(host, IPv6Address):
        return f"{scheme}://[{host.host}]:{host.port}"
    if isinstance(host, IPv4Address):
        return f"{scheme}://{host.host}:{host.port}"
    return str(host)


@implementer(IStreamServerEndpoint)
class _Announcing:
    """
    Wraps a server endpoint to log ``listening on ...`` once it is bound, warn about
    unauthenticated TCP on non-loopback addresses, and record the listener.
    """

    def __init__(
        self, endpoint: IStreamServerEndpoint, description: str, bound: list[str]
    ) -> None:
        self._endpoint = endpoint
        self._description = description
        self._bound = bound

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        d = self._endpoint.listen(factory)
        d.addCallback(self._announce)
        return d

    def _announce(self, port: IListeningPort) -> IListeningPort:
        tls = self._description.split(":", 1)[0] in ("ssl", "tls")
        uri = describe(port.getHost(), tls)
        self._bound.append(uri)
        log.info("listening on {uri}", uri=uri)
        host = port.getHost()
        if isinstance(host, (IPv4Address, IPv6Address)) and not tls:
            try:
                loopback = ipaddress.ip_address(host.host.split("%")[0]).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                log.warn(
                    "{uri} is plain TCP on a non-loopback address: anyone who can reach "
                    "it can call every method, unauthenticated. Restrict it with a "
                    "firewall or VPN, or use TLS.",
                    uri=uri,
                )
        return port


class Listeners(service.MultiService):
    """
    The listeners of one process, all serving one factory.

    :param factory: the protocol factory (an HTTP site)
    :param descriptions: Twisted server endpoint strings
    :param socket_dirs: directories to create (mode 0755) before binding, for the Unix
        sockets among the descriptions
    :param reactor: the reactor
    """

    def __init__(
        self,
        factory: Factory,
        descriptions: Iterable[str],
        socket_dirs: Iterable[str] = (),
        reactor: Any = None,
    ) -> None:
        service.MultiService.__init__(self)
        #: URIs of the bound listeners, in the order they came up.
        self.bound: list[str] = []
        self._socket_dirs = tuple(socket_dirs)
        self._factory = factory
        for description in descriptions:
            svc = strports.service(description, factory, reactor=reactor)
            svc.endpoint = _Announcing(svc.endpoint, description, self.bound)
            svc.setServiceParent(self)

    def add_tls(
        self, address: ListenAddress, creator: ServerTLS, reactor: Any = None
    ) -> service.Service:
        """
        Also serve mutual TLS on a TCP address, in the same reactor as the others.  Like
        the others, it aborts start-up when it cannot bind.

        :param address: a :class:`~hero_compute.rpc.addresses.ListenAddress`
        :param creator: a :class:`~hero_compute.rpc.tls.ServerTLS` (reloadable: new
            connections use its current certificate)
        """
        from twisted.application.internet import StreamServerEndpointService
        from twisted.internet import endpoints

        from .tls import tls_server_factory

        if reactor is None:
            from twisted.internet import reactor
        description = address.endpoint_string()
        endpoint = endpoints.serverFromString(reactor, description)
        svc = StreamServerEndpointService(
            _Announcing(endpoint, "tls:" + description, self.bound),
            tls_server_factory(creator, self._factory),
        )
        # As strports.service does: a bind failure aborts twistd instead of being logged.
        svc._raiseSynchronously = True
        svc.setServiceParent(self)
        return svc

    def privilegedStartService(self) -> None:
        for path in self._socket_dirs:
            os.makedirs(path, mode=0o755, exist_ok=True)
        for svc in self:
            socket_path = _unix_path_of(svc.endpoint._description)
            if socket_path is not None:
                clear_stale_socket(socket_path)
        service.MultiService.privilegedStartService(self)

    def stopService(self) -> Deferred[None] | None:
        d: Deferred[None] | None = service.MultiService.stopService(self)
        self.bound.clear()
        return d
