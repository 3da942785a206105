"""
Listeners: one process serves the same site on any number of Twisted server endpoint
strings (its Unix socket, TCP, TLS, systemd-passed sockets).

Each listener is a :obj:`strports.service`, so a listener that cannot bind aborts start-up
(twistd exits 1) instead of leaving a process that serves nothing.  That failure is a
:class:`StartupFailed` whose message names the setting and the fix, and what the failed
start had created (sockets, their lock files, the socket directory) is removed first.

Long because: a bind failure is explained here, where the endpoint strings are known, one
operator mistake (port taken, socket served, directory unwritable) per branch.
"""

from __future__ import annotations

import errno
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
from twisted.internet.error import CannotListenError
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


class StartupFailed(Exception):
    """
    The process cannot start as configured.  Its message is the whole story for the
    operator, on one line: what failed, the variable or option that set it, and the fix;
    so it is printed as it is, without a traceback.
    """


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


def _tcp_uri_of(description: str) -> str:
    """
    ``tcp://host:port`` for a ``tcp:``/``tcp6:`` server endpoint string (``tls://`` for
    one prefixed ``tls:``), else the string.
    """
    scheme = "tcp"
    if description.startswith("tls:"):
        scheme, description = "tls", description[4:]
    kind, _, rest = description.partition(":")
    if kind not in ("tcp", "tcp6"):
        return description
    port, host = None, "0.0.0.0" if kind == "tcp" else "::"
    for arg in re.findall(r"(?:\\.|[^:\\])+", rest):
        text = re.sub(r"\\(.)", r"\1", arg)
        key, eq, value = text.partition("=")
        if not eq:
            port = text
        elif key == "port":
            port = value
        elif key == "interface":
            host = value
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _lock_owner(path: str) -> int | None:
    """The pid in a Twisted lock file (a symlink naming it), or None."""
    try:
        return int(os.readlink(path + ".lock"))
    except (OSError, ValueError):
        return None


def _why(error: BaseException, description: str, role: str, source: str) -> str:
    """
    One line for a listener that could not bind: what, which setting, how to fix it.

    :param error: what the endpoint's ``listen`` failed with
    :param description: its server endpoint string
    :param role: ``explorer`` or ``node``
    :param source: the variable or option that asked for it
    """
    path = _unix_path_of(description)
    where = f"unix://{path}" if path is not None else _tcp_uri_of(description)
    reason = error.socketError if isinstance(error, CannotListenError) else error
    if path is not None and reason == "Cannot acquire lock":
        pid = _lock_owner(path)
        return (
            f"another {role}, pid {pid}, serves {path} ({source}); stop it, or set "
            f"{source} to another path"
        )
    code = getattr(reason, "errno", None)
    if code == errno.EADDRINUSE:
        if path is not None:
            hint = f"another process serves it (ss -xlp src {path})"
        else:
            port = where.rsplit(":", 1)[-1]
            hint = f"another process has it (ss -ltnp 'sport = :{port}')"
        return f"cannot listen on {where} ({source}): address already in use; {hint}"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        if path is not None:
            hint = (
                f"set {source} to a place this user (uid {os.getuid()}) may write, or "
                f"make {os.path.dirname(path)} writable for it"
            )
        else:
            hint = "ports below 1024 need root or CAP_NET_BIND_SERVICE; choose another"
        return f"cannot listen on {where} ({source}): permission denied; {hint}"
    if code == errno.EADDRNOTAVAIL:
        return (
            f"cannot listen on {where} ({source}): no interface of this machine has "
            "that address; use one of its addresses, or 0.0.0.0"
        )
    text = getattr(reason, "strerror", None) or str(reason)
    return f"cannot listen on {where} ({source}): {text}"


def _unusable(description: str, error: Exception) -> str:
    """One line for a server endpoint string that names no usable endpoint."""
    if description.startswith("systemd:") and isinstance(error, (KeyError, IndexError)):
        return (
            f"--listen {description}: systemd passed no such socket (LISTEN_FDS, "
            "LISTEN_FDNAMES); start it through its .socket unit (or "
            "systemd-socket-activate), or drop this --listen"
        )
    return f"--listen {description}: {error}"


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


def _makedirs(path: str, created: list[str]) -> None:
    """
    ``os.makedirs(path, 0o755)``, adding each directory it creates to ``created``,
    outermost first.
    """
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            continue
        except OSError as e:
            e.filename = directory
            raise
        created.append(directory)


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
        self._role = "process"
        self._sources: dict[str, str] = {}
        for description in descriptions:
            try:
                svc = strports.service(description, factory, reactor=reactor)
            except (ValueError, KeyError, IndexError) as e:
                raise StartupFailed(_unusable(description, e)) from None
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

        from .admission import AdmittedTLSFactory
        from .tls import tls_server_factory

        if reactor is None:
            from twisted.internet import reactor
        description = address.endpoint_string()
        endpoint = endpoints.serverFromString(reactor, description)
        # Admitted at accept, before the TLS layer, by the same limits as plain TCP.
        admission = getattr(self._factory, "admission", None)
        tls = (
            tls_server_factory(creator, self._factory)
            if admission is None
            else AdmittedTLSFactory(creator, self._factory, admission)
        )
        svc = StreamServerEndpointService(
            _Announcing(endpoint, "tls:" + description, self.bound), tls
        )
        # As strports.service does: a bind failure aborts twistd instead of being logged.
        svc._raiseSynchronously = True
        svc.setServiceParent(self)
        return svc

    def name_sources(self, role: str, sources: dict[str, str]) -> None:
        """
        Say what the listeners are for, so that a start-up failure names the setting
        the operator has to change.

        :param role: the process, ``explorer`` or ``node``
        :param sources: endpoint string (or ``tls:`` + it, or a socket directory) ->
            the variable or option it came from, e.g. ``EXPLORER_TCP_ADDR``
        """
        self._role = role
        self._sources.update(sources)

    def _source(self, key: str, default: str = "--listen") -> str:
        return self._sources.get(key, default)

    def privilegedStartService(self) -> None:
        created: list[str] = []
        try:
            for path in self._socket_dirs:
                _makedirs(path, created)
        except OSError as e:
            self._undo(created)
            source = self._source(path, "HERO_SOCKET_DIR")
            raise StartupFailed(
                f"cannot create the socket directory {e.filename or path} ({source}): "
                f"{e.strerror}; set {source} to a directory this user "
                f"(uid {os.getuid()}) may create or write"
            ) from None
        for svc in self:
            socket_path = _unix_path_of(svc.endpoint._description)
            if socket_path is not None:
                clear_stale_socket(socket_path)
        # Child by child rather than MultiService's loop: to know which one failed.
        service.Service.privilegedStartService(self)
        for svc in self:
            try:
                svc.privilegedStartService()
            except (CannotListenError, OSError) as e:
                description = svc.endpoint._description
                self._undo(created)
                raise StartupFailed(
                    _why(e, description, self._role, self._source(description))
                ) from None

    def _undo(self, directories: list[str]) -> None:
        """
        Remove what a failed start made: our Unix sockets and their lock files (the
        ports are never closed, as the process exits; their sockets go with it), then
        the directories it created, if empty.
        """
        for svc in self:
            path = _unix_path_of(svc.endpoint._description)
            if path is not None and _lock_owner(path) == os.getpid():
                for leftover in (path, path + ".lock"):
                    try:
                        os.unlink(leftover)
                    except FileNotFoundError:
                        pass
        for path in reversed(directories):
            try:
                os.rmdir(path)
            except OSError:
                pass

    def stopService(self) -> Deferred[None] | None:
        d: Deferred[None] | None = service.MultiService.stopService(self)
        self.bound.clear()
        return d
