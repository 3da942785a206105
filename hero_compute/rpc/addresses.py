"""
The one address grammar of hero_compute (CONTRACT §1).

Peers are named by URI: ``unix:///abs/path.sock`` (or the legacy bare ``/abs/path.sock``),
``tcp://host:port``, ``tcp://[v6addr]:port`` and ``tls://host:port``.  Listeners are named
``host:port`` or ``[v6addr]:port``.  Everything that reads an address from a user, an
environment variable or the wire goes through :obj:`parse_address` or :obj:`parse_listen`,
so a bad value is rejected the same way everywhere, with the accepted forms in the message.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Any

import attrs
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IStreamClientEndpoint,
)

ACCEPTED_FORMS = (
    "unix:///abs/path.sock, /abs/path.sock, tcp://host:port, "
    "tcp://[v6addr]:port, tls://host:port"
)
ACCEPTED_LISTEN_FORMS = "host:port, [v6addr]:port"

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_HOSTPORT = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>[^:]*)\Z")


class AddressError(ValueError):
    """
    A value that is not an address of the accepted forms.

    :param value: the rejected text
    :param reason: why it was rejected
    :param forms: the accepted forms, for the message
    """

    def __init__(self, value: object, reason: str, forms: str = ACCEPTED_FORMS) -> None:
        ValueError.__init__(
            self, f"invalid address {value!r}: {reason}; accepted forms: {forms}"
        )
        self.value = value
        self.reason = reason


@attrs.frozen
class Address:
    """
    Where a peer listens: a Unix socket path, or a host and port over TCP or TLS.

    :ivar scheme: ``"unix"``, ``"tcp"`` or ``"tls"``
    :ivar path: the absolute socket path (unix only)
    :ivar host: an IPv4 or IPv6 address or a DNS name (tcp and tls only)
    :ivar port: 1..65535 (tcp and tls only)
    """

    scheme: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def uri(self) -> str:
        """
        The canonical URI: legacy bare paths come out as ``unix://`` URIs.
        """
        if self.scheme == "unix":
            assert self.path is not None
            return "unix://" + self.path
        assert self.host is not None
        return f"{self.scheme}://{_bracket(self.host)}:{self.port}"

    @property
    def is_unix(self) -> bool:
        """True for a local Unix socket."""
        return self.scheme == "unix"

    def client_endpoint(
        self,
        reactor: Any,
        timeout: float | None = None,
        tls: IOpenSSLClientConnectionCreator | None = None,
    ) -> IStreamClientEndpoint:
        """
        A Twisted client endpoint that connects to this address.

        :param reactor: the reactor to connect with
        :param timeout: seconds allowed for the connection to be established
        :param tls: for a ``tls://`` address, the connection creator that verifies the
            peer (a :class:`~hero_compute.rpc.tls.ClientTLS`): peers are checked against
            the fleet CA and their SPIFFE identity, never the system's CAs and host name
        :raise ValueError: for a ``tls://`` address without ``tls``
        """
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        if self.scheme == "unix":
            return UNIXClientEndpoint(reactor, self.path, **kwargs)
        assert self.host is not None and self.port is not None
        endpoint: IStreamClientEndpoint
        try:
            version = ipaddress.ip_address(self.host).version
        except ValueError:
            # A name: resolved (in a thread), every address tried, happy eyeballs.
            endpoint = HostnameEndpoint(
                reactor, self.host.encode("ascii"), self.port, **kwargs
            )
        else:
            # An address already: straight to connect(), no resolver round trip.
            literal = TCP6ClientEndpoint if version == 6 else TCP4ClientEndpoint
            endpoint = literal(reactor, self.host, self.port, **kwargs)
        if self.scheme == "tls":
            if tls is None:
                raise ValueError(
                    f"{self.uri}: no TLS material (the fleet CA, and a certificate) to "
                    "reach a tls:// address with"
                )
            return wrapClientTLS(tls, endpoint)
        return endpoint

    def __str__(self) -> str:
        return self.uri


#: Connections the kernel may hold for a TCP listener before we accept them.  Twisted's
#: default, 50, is overrun when a fleet reconnects at once (an explorer restart: 20,000
#: connections within a second); the kernel caps it at ``net.core.somaxconn``.
LISTEN_BACKLOG = 4096


@attrs.frozen
class ListenAddress:
    """
    A TCP address to listen on, ``host:port`` or ``[v6addr]:port``.

    Port 0 asks the kernel for a free port; the real one is in the ``listening on`` log
    line.

    :ivar host: the interface address, IPv4 or IPv6 (or a name resolving to one)
    :ivar port: 0..65535
    """

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        """True when the host is an IPv6 literal."""
        return ":" in self.host

    def __str__(self) -> str:
        return f"{_bracket(self.host)}:{self.port}"


def parse_address(value: object) -> Address:
    """
    Parse a peer address of the grammar of CONTRACT §1.

    :param value: the text, e.g. ``"tcp://10.0.0.5:9002"`` or ``"/run/x.sock"``
    :return: an :obj:`Address`
    :raise AddressError: naming the value and the accepted forms

    Recent results are cached (the proxy parses a node's address per call; the
    explorer's heartbeats parse only an address a node has not given before).
    """
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise AddressError(value, "an address is a string")
    return _parse_text(value)


@functools.lru_cache(maxsize=4096)
def _parse_text(value: str) -> Address:
    if not value:
        raise AddressError(value, "empty")
    if value.startswith("/"):
        return Address("unix", path=_unix_path(value, value))
    scheme, sep, rest = value.partition("://")
    if not sep:
        raise AddressError(value, "no scheme and not an absolute path")
    scheme = scheme.lower()
    if scheme == "unix":
        if not rest.startswith("/"):
            raise AddressError(value, "a unix socket path must be absolute (unix:///path)")
        return Address("unix", path=_unix_path(value, rest))
    if scheme in ("tcp", "tls"):
        if "/" in rest or "?" in rest or "#" in rest or "@" in rest:
            raise AddressError(value, "only host:port may follow the scheme")
        host, port = _host_port(value, rest, ACCEPTED_FORMS, allow_zero=False)
        return Address(scheme, host=host, port=port)
    raise AddressError(value, f"unsupported scheme {scheme!r}")


def parse_listen(value: object) -> ListenAddress:
    """
    Parse a TCP listen address, ``host:port`` or ``[v6addr]:port``.

    :param value: the text, e.g. ``"0.0.0.0:9002"`` or ``"[::1]:9002"``
    :return: a :obj:`ListenAddress`
    :raise AddressError: naming the value and the accepted forms
    """
    if isinstance(value, ListenAddress):
        return value
    if not isinstance(value, str) or not value:
        raise AddressError(value, "empty", ACCEPTED_LISTEN_FORMS)
    host, port = _host_port(value, value, ACCEPTED_LISTEN_FORMS, allow_zero=True)
    return ListenAddress(host, port)


#: The longest Unix socket path the kernel accepts (sun_path is 108 bytes, NUL included).
MAX_UNIX_PATH = 107


def _unix_path(value: str, path: str) -> str:
    if "\x00" in path:
        raise AddressError(value, "a socket path cannot contain NUL")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_UNIX_PATH:
        raise AddressError(value, f"a socket path is at most {MAX_UNIX_PATH} bytes")
    if path.endswith("/"):
        raise AddressError(value, "a socket path names a file, not a directory")
    return path


def _host_port(value: str, text: str, forms: str, allow_zero: bool) -> tuple[str, int]:
    match = _HOSTPORT.match(text)
    if match is None:
        raise AddressError(value, "expected host:port (IPv6 in brackets)", forms)
    port = _port(value, match["port"], forms, allow_zero)
    if match["v6"] is not None:
        try:
            addr = ipaddress.IPv6Address(match["v6"])
        except ValueError:
            raise AddressError(
                value, f"{match['v6']!r} is not an IPv6 address", forms
            ) from None
        return str(addr), port
    host = match["host"]
    if not host:
        raise AddressError(value, "missing host", forms)
    if re.fullmatch(r"[0-9.]+", host):
        try:
            return str(ipaddress.IPv4Address(host)), port
        except ValueError:
            raise AddressError(value, f"{host!r} is not an IPv4 address", forms) from None
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise AddressError(value, f"{host!r} is not a valid host name", forms)
    return host.lower(), port


def _port(value: str, text: str, forms: str, allow_zero: bool) -> int:
    if not text.isascii() or not text.isdigit():
        raise AddressError(value, "the port must be a number", forms)
    if len(text) > 5:
        # Also keeps int() away from its limit on very long digit strings.
        raise AddressError(value, "the port is out of range", forms)
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise AddressError(value, f"port {port} is out of range {low}..65535", forms)
    return port


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@functools.lru_cache(maxsize=4096)
def forbidden_target(host: str) -> str | None:
    """
    Why a peer on another host may not have us connect to ``host``, or None: the
    address policy of the explorer's proxy and of the node's image downloads (CONTRACT
    §6, §8): no loopback, link-local, unspecified or multicast targets.

    :param host: an IP address as text (names are resolved first)

    Cached: every call to a node on another host asks again about the same address.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    for kind, forbidden in (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("unspecified", ip.is_unspecified),
        ("multicast", ip.is_multicast),
    ):
        if forbidden:
            return f"{host} is a {kind} address"
    return None
