"""
The explorer's RPC methods, its proxy to nodes, and the service tree that serves them.
"""

from twisted.application import service
from twisted.logger import Logger

import hero_compute
from hero_compute.rpc.addresses import AddressError, parse_address
from hero_compute.rpc.dispatch import Dispatcher
from hero_compute.rpc.errors import (
    InvalidParams,
    NodeOffline,
    NodeUnreachable,
    RefusedByPolicy,
    TransportError,
)
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.http_server import make_factory
from hero_compute.rpc.listeners import Listeners
from hero_compute.rpc.schema import load_schema

from .registry import Heartbeat, LivenessLog, Registry, sweep_interval

log = Logger()

#: Only these method families may be proxied: ``explorer.call`` must not become a way to
#: reach anything else a node (or whatever answers at a node's address) might serve.
PROXIED_PREFIXES = ("node.", "vm.")

#: Seconds a proxied call may take: longer than a node's slowest operation, a graceful
#: ``vm.stop`` (about 65 s at worst).
CALL_TIMEOUT = 90.0

#: Seconds a proxied call may spend connecting: a node that cannot even be reached
#: within this is reported unreachable (-32003) long before :data:`CALL_TIMEOUT`.
CONNECT_TIMEOUT = 5.0

#: A node is told to heartbeat this many times per ``offline_after`` (``next_heartbeat``
#: in the answer): it may then miss two heartbeats in a row, to a lost packet or a slow
#: explorer, before it is declared offline.
HEARTBEATS_PER_OFFLINE = 3


class ExplorerMethods:
    """
    The ``explorer.*`` methods.

    :param registry: an :class:`INodeRegistry`
    :param client: an :class:`RpcClient` for proxied calls
    :param clock: the clock, for uptime
    :param listeners: a :class:`Listeners` (for ``explorer.info``), or None
    :param call_timeout: seconds allowed for a proxied call
    """

    def __init__(self, registry, client, clock, listeners=None, call_timeout=CALL_TIMEOUT):
        self._registry = registry
        self._client = client
        self._clock = clock
        self._listeners = listeners
        self._started = clock.seconds()
        self.call_timeout = call_timeout

    def register(self, rpc):
        """
        Publish the methods on a :class:`~hero_compute.rpc.dispatch.Dispatcher`.
        """
        rpc.register("explorer.heartbeat", self.heartbeat, context=True)
        rpc.register("explorer.leave", self.leave)
        rpc.register("explorer.list_nodes", self.list_nodes)
        rpc.register("explorer.get_node", self.get_node)
        rpc.register("explorer.remove_node", self.remove_node)
        rpc.register("explorer.call", self.call)
        rpc.register("explorer.info", self.info)

    def heartbeat(self, context, node_id, socket_path, name=None, version="", capacity=None,
                  usage=None, vm_count=0, labels=None):
        """
        Record a node's heartbeat.

        :param context: the :class:`CallContext`; a heartbeat over TCP claiming a Unix address
            is refused, since the explorer could never reach it and a proxy to it would
            reach the explorer's own host's sockets
        """
        try:
            address = parse_address(socket_path)
        except AddressError as e:
            raise InvalidParams(f"socket_path: {e}") from None
        if context.transport != "unix" and address.is_unix:
            raise RefusedByPolicy(
                f"a heartbeat over TCP cannot claim the Unix address {address.uri}: "
                "set NODE_TCP_ADDR (and NODE_ADVERTISE_ADDR if needed) on the node"
            )
        self._registry.heartbeat(Heartbeat(
            node_id=node_id,
            socket_path=address.uri,
            transport=context.transport,
            name=name or node_id,
            version=version,
            capacity=capacity or {},
            usage=usage or {},
            vm_count=vm_count,
            labels=labels or {},
        ))
        return {"accepted": True,
                "next_heartbeat": self._registry.offline_after / HEARTBEATS_PER_OFFLINE}

    def leave(self, node_id):
        """Mark a node offline at once."""
        self._registry.leave(node_id)
        return True

    def list_nodes(self, status=None):
        """All nodes, or those of one status."""
        now = self._clock.seconds()
        after = self._registry.offline_after
        nodes = (r.to_wire(now, after) for r in self._registry.records())
        return [n for n in nodes if status is None or n["status"] == status]

    def get_node(self, node_id):
        """One node."""
        return self._registry.get(node_id).to_wire(
            self._clock.seconds(), self._registry.offline_after
        )

    def remove_node(self, node_id):
        """Forget a node."""
        self._registry.remove(node_id)
        return True

    def call(self, node_id, method, params=None):
        """
        Proxy a call to a node over its address; its result, or its error unchanged.
        """
        if not method.startswith(PROXIED_PREFIXES):
            raise RefusedByPolicy(
                f"explorer.call proxies only node.* and vm.* methods, not {method!r}"
            )
        record = self._registry.get(node_id)
        if self._registry.status(record) != "online":
            raise NodeOffline(f"node {node_id} is offline (last seen {record.last_seen:.0f})")
        d = self._client.call(record.socket_path, method, params, timeout=self.call_timeout)

        def unreachable(failure):
            failure.trap(TransportError)
            raise NodeUnreachable(
                f"node {node_id} at {record.socket_path} is unreachable: "
                f"{failure.value.reason}"
            )

        return d.addErrback(unreachable)

    def info(self):
        """About this explorer."""
        counts = {"online": 0, "offline": 0}
        for record in self._registry.records():
            counts[self._registry.status(record)] += 1
        return {
            "version": hero_compute.__version__,
            "uptime_s": self._clock.seconds() - self._started,
            "listeners": list(self._listeners.bound) if self._listeners else [],
            "nodes": counts,
        }


class ExplorerService(service.MultiService):
    """
    The explorer's root service; :func:`make_explorer` builds it and its children.

    :param registry: the :class:`Registry`
    :param client: the :class:`RpcClient` of the proxy, closed when the explorer stops
    :param rpc: the :class:`~hero_compute.rpc.dispatch.Dispatcher` serving the methods
    :param listeners: the :class:`Listeners`
    """

    def __init__(self, registry, client, rpc, listeners):
        service.MultiService.__init__(self)
        self.registry = registry
        self.client = client
        self.rpc = rpc
        self.listeners = listeners

    def stopService(self):
        d = service.MultiService.stopService(self)
        d.addBoth(lambda _: self.client.close())
        return d


def make_explorer(*, reactor, clock, listen, offline_after, socket_dirs=(),
                  call_timeout=CALL_TIMEOUT, connect_timeout=CONNECT_TIMEOUT):
    """
    Build the explorer's service tree; nothing is opened until it starts::

        ExplorerService
        ├── "listeners": Listeners (one per endpoint string) -> HTTP factory -> Dispatcher
        └── "liveness":  LivenessLog over the Registry

    :param reactor: the reactor to listen and connect with
    :param clock: an ``IReactorTime`` for liveness, uptime and the sweep (Unix seconds)
    :param listen: Twisted server endpoint strings to serve on
    :param socket_dirs: directories to create for Unix sockets when starting
    :param offline_after: seconds of silence before a node is offline
    :param call_timeout: seconds allowed for a proxied call
    :param connect_timeout: seconds allowed to connect to a node
    :return: the :class:`ExplorerService`
    """
    registry = Registry(clock, offline_after)
    client = RpcClient(reactor, timeout=call_timeout, connect_timeout=connect_timeout)
    rpc = Dispatcher(load_schema("explorer"), hero_compute.__version__)
    listeners = Listeners(make_factory(rpc), listen, socket_dirs, reactor)
    ExplorerMethods(registry, client, clock, listeners, call_timeout).register(rpc)

    explorer = ExplorerService(registry, client, rpc, listeners)
    listeners.setName("listeners")
    listeners.setServiceParent(explorer)
    liveness = LivenessLog(registry, clock, sweep_interval(offline_after))
    liveness.setName("liveness")
    liveness.setServiceParent(explorer)
    return explorer
