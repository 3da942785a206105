"""
Interfaces of the transport, for the code that uses it and for its fakes in tests.
"""

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from .addresses import Address


class IRpcClient(Interface):
    """
    Calls JSON-RPC methods on peers named by address URI (the real one is
    :class:`hero_compute.rpc.http_client.RpcClient`).
    """

    timeout = Attribute("Default seconds allowed for a whole call, connect included.")

    def call(
        address: Address | str,
        method: str,
        params: Any = None,
        timeout: float | None = None,
    ) -> Deferred[Any]:
        """
        Call a method and wait for its result.

        :param address: an :class:`~hero_compute.rpc.addresses.Address` or address URI
        :param method: the method name
        :param params: a dict (by name), a list (by position) or None
        :param timeout: seconds for this call; the client's default when None
        :return: a Deferred firing with the result, or failing with an ``RpcError`` or a
            ``TransportError``
        """

    def notify(
        address: Address | str,
        method: str,
        params: Any = None,
        timeout: float | None = None,
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

    def close() -> Deferred[None]:
        """
        Close the connections kept for later calls.

        :return: a Deferred firing when they are closed
        """
