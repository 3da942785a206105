"""
What a process listens on, as records: a :class:`Listen` says the kind (a Unix socket,
TCP, mutual TLS, or a raw Twisted endpoint string from ``--listen``), where, and which
variable or option asked for it; the Twisted endpoint is built from the record, never
from a string made for the purpose.  :class:`Announcing` logs ``listening on ...`` once
a listener is bound, the same for the JSON-RPC listeners, metrics and the dashboard.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from .addresses import LISTEN_BACKLOG, ListenAddress
from .twisted_private import raise_bind_errors

log = Logger()

#: Connections the kernel may hold for a Unix socket before we accept them (Twisted's
#: default for ``unix:`` endpoints, which we used before records).
UNIX_BACKLOG = 50


@attrs.frozen
class Listen:
    """
    One listener of a process.

    :ivar kind: ``"unix"``, ``"tcp"``, ``"tls"`` (mutual TLS over TCP), or
        ``"endpoint"``: a Twisted server endpoint string given by the operator
        (``--listen``, CONTRACT §3), built by Twisted's parser
    :ivar source: the variable or option that asked for it, named when it cannot bind
    :ivar path: the socket path (unix; an ``endpoint`` of ``unix:`` kind too)
    :ivar host: the interface (tcp and tls; an ``endpoint`` of ``tcp:`` kind too)
    :ivar port: the port, 0 for any (tcp and tls)
    :ivar mode: the Unix socket's permissions (``unix``; an ``endpoint`` of ``unix:``
        kind takes its ``mode=``, 0660 by default too)
    :ivar description: the endpoint string (``endpoint`` only)
    """

    kind: str
    source: str = "--listen"
    path: str | None = None
    host: str | None = None
    port: int | None = None
    mode: int = 0o660
    description: str | None = None

    @classmethod
    def unix(cls, path: str, source: str = "--socket") -> Listen:
        """
        A Unix socket, mode 0660.  Twisted's lock file keeps ``PATH.lock`` holding our
        pid: a stale socket left by a crash is replaced on restart, while a live owner
        makes the bind fail.

        :param path: the absolute socket path
        :param source: the variable or option it came from
        """
        return cls("unix", source, path=path)

    @classmethod
    def tcp(cls, address: ListenAddress, source: str = "--tcp") -> Listen:
        """
        Plain TCP on a :class:`~hero_compute.rpc.addresses.ListenAddress`.

        :param source: the variable or option it came from
        """
        return cls("tcp", source, host=address.host, port=address.port)

    @classmethod
    def tls(cls, address: ListenAddress, source: str = "--tls") -> Listen:
        """
        Mutual TLS on a :class:`~hero_compute.rpc.addresses.ListenAddress` (the TLS
        layer is the listener's factory; the endpoint is TCP).

        :param source: the variable or option it came from
        """
        return cls("tls", source, host=address.host, port=address.port)

    @classmethod
    def endpoint(cls, description: str, source: str = "--listen") -> Listen:
        """
        A Twisted server endpoint string as the operator gave it (``unix:...``,
        ``tcp:...``, ``ssl:...``, ``systemd:...``).  Its path, or its interface and
        port, are read once here, for clearing a stale socket and for messages.

        :param description: the endpoint string
        :param source: the option it came from
        """
        kind, _, rest = description.partition(":")
        args = _arguments(rest)
        if kind == "unix" and rest:
            path = args.get("address", args.get(0))
            return cls("endpoint", source, path=path, description=description)
        if kind in ("tcp", "tcp6", "ssl"):
            port = args.get("port", args.get(0))
            default = "::" if kind == "tcp6" else "0.0.0.0"
            return cls(
                "endpoint",
                source,
                host=args.get("interface", default),
                port=int(port) if port is not None and port.isdigit() else None,
                description=description,
            )
        return cls("endpoint", source, description=description)

    @property
    def secure(self) -> bool:
        """Whether it speaks TLS."""
        if self.kind == "endpoint":
            assert self.description is not None
            return self.description.split(":", 1)[0] in ("ssl", "tls")
        return self.kind == "tls"

    @property
    def where(self) -> str:
        """An address URI for messages: ``unix://...``, ``tcp://...``, ``tls://...``."""
        if self.path is not None:
            return f"unix://{self.path}"
        if self.host is not None and self.port is not None:
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{'tls' if self.secure else 'tcp'}://{host}:{self.port}"
        return self.description or self.kind

    def server_endpoint(self, reactor: Any) -> IStreamServerEndpoint:
        """
        The Twisted server endpoint of this listener.

        :param reactor: the reactor to listen with
        :raise ValueError: (or ``KeyError``, ``IndexError``) for an ``endpoint`` string
            that names no usable endpoint
        """
        if self.kind == "unix":
            return UNIXServerEndpoint(
                reactor, self.path, UNIX_BACKLOG, mode=self.mode, wantPID=True
            )
        if self.kind in ("tcp", "tls"):
            assert self.host is not None and self.port is not None
            kind = TCP6ServerEndpoint if ":" in self.host else TCP4ServerEndpoint
            return kind(reactor, self.port, LISTEN_BACKLOG, self.host)
        assert self.description is not None
        if self.path is not None:
            return _unix_endpoint(reactor, self.description)
        endpoint: IStreamServerEndpoint = serverFromString(reactor, self.description)
        return endpoint


#: The arguments of a ``unix:`` endpoint string, in Twisted's positional order.
_UNIX_ARGUMENTS = ("address", "mode", "backlog", "lockfile")


def _unix_endpoint(reactor: Any, description: str) -> UNIXServerEndpoint:
    """
    The endpoint of a ``unix:`` string, as Twisted's parser reads it but for the mode:
    0660 unless ``mode=`` narrows it (Twisted's default is 0666, and whoever may connect
    to a Unix socket may call every method, CONTRACT §3, §6).

    :raise ValueError: for an unknown argument, a value that is no number, or a mode
        that lets other users connect
    """
    given = _arguments(description.partition(":")[2])
    args: dict[str, str] = {}
    for key, value in given.items():
        if isinstance(key, int):
            if key >= len(_UNIX_ARGUMENTS):
                raise ValueError(f"unexpected argument {value!r}")
            key = _UNIX_ARGUMENTS[key]
        if key not in _UNIX_ARGUMENTS:
            raise ValueError(
                f"unknown argument {key}= (takes {', '.join(_UNIX_ARGUMENTS)})"
            )
        args[key] = value
    try:
        mode = int(args.get("mode", "660"), 8)
    except ValueError:
        raise ValueError(f"mode={args['mode']} is no octal mode (e.g. 600)") from None
    if mode & ~0o770:
        raise ValueError(
            f"mode={args['mode']} lets other users connect, and a Unix caller may call "
            "every method; leave mode= out for 0660, or narrow it (e.g. mode=600)"
        )
    return UNIXServerEndpoint(
        reactor,
        args["address"],
        int(args.get("backlog", UNIX_BACKLOG)),
        mode=mode,
        wantPID=bool(int(args.get("lockfile", "1"))),
    )


def _arguments(text: str) -> dict[int | str, str]:
    """
    The arguments of an endpoint string after its kind: positional ones by index,
    ``key=value`` by key; arguments are separated by unescaped colons.
    """
    args: dict[int | str, str] = {}
    position = 0
    for arg in re.findall(r"(?:\\.|[^:\\])+", text):
        value = re.sub(r"\\(.)", r"\1", arg)
        key, eq, rest = value.partition("=")
        if eq:
            args[key] = rest
        else:
            args[position] = value
            position += 1
    return args


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
class Announcing:
    """
    A server endpoint that logs ``listening on <uri>`` once it is bound (CONTRACT §3).

    :param endpoint: the endpoint to wrap
    :param listen: its :class:`Listen`
    :param bound: a list the bound URI is appended to, or None
    :param detail: ``detail(uri)``: what follows the URI in the log line (e.g. the
        dashboard's URL), or None
    :param before: called before binding (e.g. to write the dashboard's token), or None
    :param warn_plain: warn that plain TCP on a non-loopback address is unauthenticated
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        listen: Listen,
        *,
        bound: list[str] | None = None,
        detail: Callable[[str], str] | None = None,
        before: Callable[[], None] | None = None,
        warn_plain: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.listen_record = listen
        self._bound = bound
        self._detail = detail
        self._before = before
        self._warn_plain = warn_plain

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Bind, as the wrapped endpoint does, and announce it."""
        if self._before is not None:
            self._before()
        d = self.endpoint.listen(factory)
        d.addCallback(self._announce)
        return d

    def _announce(self, port: IListeningPort) -> IListeningPort:
        host = port.getHost()
        tls = self.listen_record.secure
        uri = describe(host, tls)
        if self._bound is not None:
            self._bound.append(uri)
        detail = "" if self._detail is None else self._detail(uri)
        log.info("listening on {uri}{detail}", uri=uri, detail=detail)
        if self._warn_plain and isinstance(host, (IPv4Address, IPv6Address)) and not tls:
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


def listener_service(
    listen: Listen, factory: IProtocolFactory, reactor: Any, **announce: Any
) -> StreamServerEndpointService:
    """
    The service of one listener: it binds in ``privilegedStartService`` and, as
    :obj:`twisted.application.strports.service` does, a bind failure raises there
    (twistd exits) instead of being logged.

    :param listen: the :class:`Listen`
    :param factory: what serves its connections
    :param reactor: the reactor to listen with
    :param announce: keyword arguments of :class:`Announcing`
    :raise ValueError: (or ``KeyError``, ``IndexError``) for an unusable endpoint string
    """
    if reactor is None:
        from twisted.internet import reactor
    endpoint = Announcing(listen.server_endpoint(reactor), listen, **announce)
    svc = StreamServerEndpointService(endpoint, factory)
    raise_bind_errors(svc)
    return svc
