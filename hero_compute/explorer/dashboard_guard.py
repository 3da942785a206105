"""
What the dashboard checks of a request before anything else, against a browser turned
against it: the ``Host`` it was asked for (DNS rebinding) and, for ``POST /rpc``, the
``Origin`` that sent it (cross-site requests).

DNS rebinding: a page of ``evil.example`` whose name then resolves to 127.0.0.1 makes the
operator's browser talk to a loopback dashboard as ``evil.example``, same-origin to that
page.  The browser still says ``Host: evil.example``: so the dashboard answers only for
the names it was given (``EXPLORER_UI_HOSTS``) and for IP literals of its own listener,
and anything else is 421 (Misdirected Request).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.web.server import Request


#: The names answered for when ``EXPLORER_UI_HOSTS`` is not set, besides the listen host.
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def _name(host: str) -> str | None:
    """
    The host of a ``Host`` header value or a host name, without its port and brackets,
    lower-cased; None if there is none.
    """
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 1 else None
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".") or None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostGuard:
    """
    The ``Host`` names a dashboard answers for.

    :param hosts: the names (``EXPLORER_UI_HOSTS``), with or without brackets for IPv6
        literals; None for :data:`DEFAULT_HOSTS`
    """

    def __init__(self, hosts: Iterable[str] | None = None) -> None:
        names = DEFAULT_HOSTS if hosts is None else hosts
        self.names = frozenset(n for n in map(_name, names) if n)

    def allows(self, request: Request) -> bool:
        """
        :param request: a ``twisted.web`` request
        :return: whether its ``Host`` is one of ours: a given name, or an IP literal of
            the listener the request came in on
        """
        header = request.getHeader(b"host")
        if header is None:
            return False
        name = _name(header.decode("latin-1"))
        if name is None:
            return False
        if name in self.names:
            return True
        local = getattr(request.getHost(), "host", None)
        if not local or not _is_ip(name):
            return False
        return ipaddress.ip_address(name) == ipaddress.ip_address(local.split("%")[0])


def same_origin(request: Request) -> bool:
    """
    :param request: a ``twisted.web`` request whose ``Host`` :class:`HostGuard` allowed
    :return: whether its ``Origin`` names this very origin (scheme, host and port); a
        request without one is not (browsers send it with every POST)
    """
    origin = request.getHeader(b"origin")
    host = request.getHeader(b"host")
    if origin is None or host is None:
        return False
    scheme = b"https" if request.isSecure() else b"http"
    return origin.strip().lower() == b"%s://%s" % (scheme, host.strip().lower())
