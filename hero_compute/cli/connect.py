"""
The CLI's one door to the transport: every import of :mod:`hero_compute.rpc` lives here,
so a move inside ``rpc`` touches one file of the CLI.

:class:`Explorer` wraps an :class:`~hero_compute.rpc.http_client.RpcClient` bound to the
explorer addresses given (the next one used when one cannot be reached), with the
per-operation timeouts of :data:`TIMEOUTS`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hero_compute.options import socket_dir
from hero_compute.rpc.addresses import AddressError, parse_address
from hero_compute.rpc.errors import (
    CallTimedOut,
    ConnectionRefused,
    ConnectTimedOut,
    MethodNotFound,
    NodeNotFound,
    NodeOffline,
    NodeUnreachable,
    RefusedByPolicy,
    RpcError,
    TransportError,
    VmNotFound,
)
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.tls import ClientTLS, Expected, TLSConfigError, TLSMaterial
from hero_compute.rpc.websocket import HTTPRefusal
from hero_compute.rpc.websocket_client import connect as open_websocket

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from hero_compute.rpc.addresses import Address
    from hero_compute.rpc.websocket import Handler, WebSocket


__all__ = [
    "AddressError",
    "CallTimedOut",
    "Explorer",
    "HTTPRefusal",
    "MethodNotFound",
    "NodeNotFound",
    "NodeOffline",
    "NodeUnreachable",
    "RefusedByPolicy",
    "RpcError",
    "TransportError",
    "VmNotFound",
    "default_explorer",
    "parse_address",
]

#: Seconds allowed to open a connection: a dead explorer fails fast whatever the call.
CONNECT_TIMEOUT = 5.0

#: Seconds allowed for a whole call, by method; others get :data:`DEFAULT_TIMEOUT`.
#: ``vm.stop`` waits out the node's 30 s ACPI grace period before it forces the VM off,
#: and goes past the explorer's own 90 s proxy timeout, so that a slow node is reported
#: by the explorer (-32003, with its reason) rather than by our clock.
TIMEOUTS = {
    "vm.create": 120.0,
    "vm.start": 60.0,
    "vm.stop": 100.0,
    "vm.delete": 100.0,
}

#: Bytes of console input waiting for the explorer beyond which the console is dropped.
CONSOLE_UNSENT = 1024 * 1024

#: Seconds for reads (lists, info) and anything not in :data:`TIMEOUTS`.
DEFAULT_TIMEOUT = 15.0


def timeout_for(method: str) -> float:
    """
    :param method: a node or explorer method name
    :return: the seconds a call of it is allowed by default
    """
    return TIMEOUTS.get(method, DEFAULT_TIMEOUT)


def default_explorer(env: Mapping[str, str]) -> str:
    """
    :param env: the environment mapping
    :return: the default explorer URI, from ``HERO_SOCKET_DIR``
    :raise ValueError: when ``HERO_SOCKET_DIR`` is not absolute
    """
    try:
        directory = socket_dir(env)
    except Exception as e:  # a twisted UsageError; its text names the variable
        raise ValueError(str(e)) from None
    return "unix://" + os.path.join(directory, "hero_compute_explorer.sock")


class Explorer:
    """
    Calls to an explorer, and through it to its nodes.  Given several explorers (of one
    fleet), a call that cannot reach one -- refused, or no connection in time, so
    nothing was sent -- goes to the next, which is used from then on; only when none
    can be reached does the call fail.

    :param reactor: the reactor
    :param address: the explorers' :class:`~hero_compute.rpc.addresses.Address` es, a
        list (or one)
    :param timeout: seconds for every call, overriding :data:`TIMEOUTS`; None for those
    :param tls_files: ``(ca, cert, key)`` files for a ``tls://`` explorer (cert and key
        may be None: the explorer then lets us do next to nothing)
    :raise ValueError: the TLS files cannot be used, saying why
    """

    def __init__(
        self,
        reactor: Any,
        address: Address | list[Address],
        timeout: float | None = None,
        tls_files: tuple[str | None, str | None, str | None] = (None, None, None),
    ) -> None:
        self.reactor = reactor
        self.addresses = list(address) if isinstance(address, list) else [address]
        #: The explorer in use: the first, or the one that answered last.
        self.address = self.addresses[0]
        self._override = timeout
        connect = self._connect = min(CONNECT_TIMEOUT, timeout or CONNECT_TIMEOUT)
        tls = None
        ca, cert, key = tls_files
        if any(a.scheme == "tls" for a in self.addresses):
            if ca is None:
                raise ValueError("TLS: a tls:// explorer needs the fleet CA (--ca)")
            try:
                tls = ClientTLS(TLSMaterial(cert, key, ca), Expected("explorer"))
            except TLSConfigError as e:
                raise ValueError(f"TLS: {e}") from None
        self._client = RpcClient(
            reactor, timeout=DEFAULT_TIMEOUT, connect_timeout=connect, tls=tls
        )

    def timeout(self, method: str) -> float:
        """:return: the seconds allowed for a call of ``method``"""
        return self._override if self._override is not None else timeout_for(method)

    async def call(
        self, method: str, params: Any = None, timeout: float | None = None
    ) -> Any:
        """
        Call a method of the explorer itself.

        :param timeout: seconds, or None for :meth:`timeout` of the method
        :return: the result
        :raise RpcError: the explorer answered with an error
        :raise TransportError: no answer (refused, timed out, not JSON-RPC)
        """
        seconds = timeout if timeout is not None else self.timeout(method)
        start = self.addresses.index(self.address)
        order = self.addresses[start:] + self.addresses[:start]
        for address in order:
            try:
                result = await self._client.call(address, method, params, timeout=seconds)
            except (ConnectionRefused, ConnectTimedOut):
                if address is order[-1]:
                    if len(order) > 1:
                        raise ConnectionRefused(
                            address,
                            "no explorer could be reached (tried "
                            + ", ".join(a.uri for a in order)
                            + ")",
                        ) from None
                    raise
                continue
            self.address = address
            return result
        raise AssertionError("not reached")  # the loop returns or raises

    async def node_call(
        self,
        node_id: str,
        method: str,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """
        Call a ``node.*`` or ``vm.*`` method on a node through ``explorer.call``.

        :param timeout: seconds, or None for :meth:`timeout` of the node method
        :return: the node's result
        """
        message: dict[str, Any] = {"node_id": node_id, "method": method}
        if params is not None:
            message["params"] = params
        seconds = timeout if timeout is not None else self.timeout(method)
        return await self.call("explorer.call", message, timeout=seconds)

    def console(self, node_id: str, vm_id: str, handler: Handler) -> Deferred[WebSocket]:
        """
        Open a VM's serial console through the explorer (a WebSocket).

        :param handler: the ``websocket.Handler`` of the session
        :return: a Deferred of the open ``WebSocket``; fails with :class:`HTTPRefusal`
            (the status the explorer or the node answered) or a connection failure
        """
        endpoint = self.address.client_endpoint(
            self.reactor, self._connect, self._client.tls
        )
        target = f"/v1/nodes/{node_id}/vms/{vm_id}/console"
        host = self.address.host or "localhost"
        return open_websocket(
            endpoint,
            host,
            target,
            handler,
            CONSOLE_UNSENT,
            DEFAULT_TIMEOUT,
            self.reactor,
        )

    def events(self, since: int | None, handler: Handler) -> Deferred[WebSocket]:
        """
        Follow the explorer's event stream (``/v1/events``, a WebSocket).

        :param since: replay the events after this seq first, or None for none
        :param handler: the ``websocket.Handler`` that gets the frames
        :return: a Deferred of the open ``WebSocket``, as :meth:`console`
        """
        endpoint = self.address.client_endpoint(
            self.reactor, self._connect, self._client.tls
        )
        target = "/v1/events" if since is None else f"/v1/events?since={int(since)}"
        return open_websocket(
            endpoint,
            self.address.host or "localhost",
            target,
            handler,
            CONSOLE_UNSENT,
            DEFAULT_TIMEOUT,
            self.reactor,
        )

    def close(self) -> Deferred[None]:
        """:return: a Deferred firing when the connections are closed"""
        return self._client.close()
