"""
Interfaces of the transport, for the code that uses it and for its fakes in tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from .addresses import Address

if TYPE_CHECKING:
    from .tls import ClientTLS, Expected


class IRpcClient(Interface):
    """
    Calls JSON-RPC methods on peers named by address URI (the real one is
    :class:`hero_compute.rpc.http_client.RpcClient`).
    """

    timeout = Attribute("Default seconds allowed for a whole call, connect included.")
    tls = Attribute(
        "The :class:`~hero_compute.rpc.tls.ClientTLS` for ``tls://`` peers, or None."
    )

    def call(
        address: Address | str,
        method: str,
        params: Any = None,
        timeout: float | None = None,
        expect: Expected | None = None,
    ) -> Deferred[Any]:
        """
        Call a method and wait for its result.

        :param address: an :class:`~hero_compute.rpc.addresses.Address` or address URI
        :param method: the method name
        :param params: a dict (by name), a list (by position) or None
        :param timeout: seconds for this call; the client's default when None
        :param expect: over TLS, the :class:`~hero_compute.rpc.tls.Expected` peer (the
            handshake fails unless the peer's certificate names it); None: the
            client's own expectation
        :return: a Deferred firing with the result, or failing with an ``RpcError`` or a
            ``TransportError``
        """

    def notify(
        address: Address | str,
        method: str,
        params: Any = None,
        timeout: float | None = None,
        expect: Expected | None = None,
    ) -> Deferred[None]:
        """
        Send a notification: the peer runs the method and answers nothing.

        :return: a Deferred firing with None once the peer has acknowledged it
        """

    def local_host(address: Address | str, timeout: float | None = None) -> Deferred[str]:
        """
        Our own IP address on a connection to a TCP peer.

        :return: a Deferred firing with the address, as text
        """

    def use_tls(tls: ClientTLS) -> None:
        """
        Reach ``tls://`` peers with this material from now on.

        :param tls: a :class:`~hero_compute.rpc.tls.ClientTLS`
        """

    def retire_connections() -> None:
        """New calls use new connections (e.g. after our TLS material was reloaded)."""

    def close() -> Deferred[None]:
        """
        Close the connections kept for later calls.

        :return: a Deferred firing when they are closed
        """
