"""
The explorer -> node leg of a console (CONTRACT §8): ``GET
/v1/nodes/<node_id>/vms/<vm_id>/console`` on every explorer listener opens the node's
own console WebSocket over the node's transport, with the checks of a proxied call
(online, the address policy, over TLS the node's certificate naming that node), and
relays binary frames both ways.

The node's refusal reaches the caller as the same status (404, 409, 429); an unknown or
offline node is 404, a node that cannot be reached 502.  Backpressure: a caller that
does not read is dropped once ``max_unsent`` bytes wait for it (the node then lets go
of that viewer); while the node does not take what the caller types, the caller is not
read.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from hero_compute.rpc.errors import NodeNotFound, NodeOffline, RefusedByPolicy
from hero_compute.rpc.websocket import GOING_AWAY, HTTPRefusal, WebSocket
from hero_compute.rpc.websocket_client import connect
from hero_compute.rpc.websocket_server import Route, UpgradeRequest

log = Logger()

#: The console's path on every explorer listener.
PATH = re.compile(
    r"/v1/nodes/(?P<node_id>[A-Za-z0-9._-]{1,64})"
    r"/vms/(?P<vm_id>[A-Za-z0-9_.-]{1,64})/console/?"
)

#: Statuses of the node passed on as they are, each with our own words: no byte of a
#: node's refusal reaches the caller (CONTRACT §6), whose terminal may print it.  Any
#: other status is a bad gateway.
PASSED_ON = {
    403: "node {node_id} refuses this explorer its consoles",
    404: "no VM {vm_id} on node {node_id}",
    409: "VM {vm_id} on node {node_id} is not running",
    429: "VM {vm_id} on node {node_id} has as many consoles attached as it allows",
}


class _Side:
    """One leg of the relay (a :class:`~hero_compute.rpc.websocket.Handler`)."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self.socket: WebSocket | None = None

    def opened(self, socket: WebSocket) -> None:
        self.socket = socket
        socket.writable = lambda writable: self._relay.writable(self, writable)

    def received(self, data: bytes) -> None:
        self._relay.received(self, data)

    def closed(self, code: int | None) -> None:
        self.socket = None
        self._relay.closed(self)


class Relay:
    """A caller's WebSocket and the node's, joined."""

    def __init__(self) -> None:
        self.caller = _Side(self)
        self.node = _Side(self)

    def _other(self, side: _Side) -> _Side:
        return self.node if side is self.caller else self.caller

    def received(self, side: _Side, data: bytes) -> None:
        """Frames from one side go to the other."""
        other = self._other(side).socket
        if other is not None:
            other.send(data)

    def writable(self, side: _Side, writable: bool) -> None:
        """What is written to the node waits: stop (or resume) reading the caller."""
        if side is not self.node or self.caller.socket is None:
            return
        if writable:
            self.caller.socket.resume_reading()
        else:
            self.caller.socket.pause_reading()

    def closed(self, side: _Side) -> None:
        """One side is gone: the other goes too."""
        other = self._other(side).socket
        if other is not None:
            other.close(GOING_AWAY, "the other side of the console is gone")


def console_route(
    proxy: Any, reactor: Any, connect_timeout: float, max_unsent: int
) -> Route:
    """
    The explorer's console route.

    :param proxy: the :class:`~hero_compute.explorer.proxy.Proxy` (its checks)
    :param reactor: the reactor to connect with
    :param connect_timeout: seconds for reaching the node and its answer
    :param max_unsent: bytes waiting for a peer beyond which it is dropped
    """

    def accept(request: UpgradeRequest) -> defer.Deferred[_Side]:
        node_id, vm_id = request.params["node_id"], request.params["vm_id"]
        try:
            d = proxy.endpoint(node_id, reactor, connect_timeout)
        except (NodeNotFound, NodeOffline) as e:
            raise HTTPRefusal(404, str(e)) from None
        relay = Relay()

        def open_node(found: tuple[Any, Any]) -> defer.Deferred[WebSocket]:
            endpoint, address = found
            host = address.host if address.host is not None else "localhost"
            return connect(
                endpoint,
                host,
                f"/v1/vms/{vm_id}/console",
                relay.node,
                max_unsent,
                connect_timeout,
                reactor,
            )

        def failed(failure: Failure) -> None:
            if isinstance(failure.value, HTTPRefusal):
                status = failure.value.status
                if status in PASSED_ON:
                    words = PASSED_ON[status].format(node_id=node_id, vm_id=vm_id)
                    raise HTTPRefusal(status, words)
                raise HTTPRefusal(502, f"node {node_id} answered HTTP {status}")
            if failure.check(RefusedByPolicy):
                raise HTTPRefusal(403, failure.getErrorMessage())
            if failure.check(defer.CancelledError):
                failure.raiseException()
            raise HTTPRefusal(
                502, f"node {node_id} is unreachable: {failure.getErrorMessage()}"
            )

        d.addCallback(open_node)
        d.addCallbacks(lambda _: relay.caller, failed)
        return d

    return Route("console", PATH, accept)
