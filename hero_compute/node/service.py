"""
The node's RPC methods and the service tree that serves them and heartbeats explorers.
"""

import os
import uuid

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

import hero_compute
from hero_compute.rpc.addresses import Address
from hero_compute.rpc.dispatch import Dispatcher
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.http_server import make_factory
from hero_compute.rpc.listeners import Listeners, unix_endpoint_string
from hero_compute.rpc.schema import load_schema

from .heartbeat import HeartbeatLoop

log = Logger()

#: Seconds allowed for the goodbyes sent to explorers on a graceful stop.
LEAVE_TIMEOUT = 2.0


def load_node_id(state_dir):
    """
    The node's persisted id, generated on first use.

    :param state_dir: the node's state directory
    :return: the id
    """
    path = os.path.join(state_dir, "node_id")
    try:
        with open(path) as f:
            node_id = f.read().strip()
        if node_id:
            return node_id
    except FileNotFoundError:
        pass
    node_id = uuid.uuid4().hex
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(node_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return node_id


class NodeService(service.MultiService):
    """
    A node: its listeners, its VM manager and one heartbeat loop per explorer.

    :param reactor: the reactor
    :param socket_path: the node's Unix socket path
    :param tcp: a L{ListenAddress} to also listen on, or None
    :param listen: further Twisted server endpoint strings
    :param explorers: L{Address}es of the explorers to heartbeat
    :param vms: an L{IVmManager} (an C{IService} too when it has one)
    :param state_dir: where the node id lives
    :param node_id: a fixed id, or None to use the persisted one
    :param name: the node's human name
    :param advertise: the L{Address} reported to TCP explorers, or None to derive it
    :param interval: seconds between heartbeats
    """

    def __init__(self, reactor, socket_path, tcp, listen, explorers, vms, state_dir,
                 node_id=None, name="", advertise=None, interval=10.0):
        service.MultiService.__init__(self)
        self._reactor = reactor
        self.node_id = node_id
        self.name = name
        self._state_dir = state_dir
        self.unix_address = Address("unix", path=socket_path)
        self._tcp = tcp
        self._advertise = advertise
        self.vms = vms
        self.client = RpcClient(reactor, timeout=interval)
        self.rpc = Dispatcher(load_schema("node"), hero_compute.__version__)
        descriptions = [unix_endpoint_string(socket_path)]
        if tcp is not None:
            descriptions.append(tcp.endpoint_string())
        descriptions.extend(listen)
        self.listeners = Listeners(make_factory(self.rpc), descriptions,
                                   [os.path.dirname(socket_path)], reactor)
        self.listeners.setServiceParent(self)
        if service.IService.providedBy(vms):
            vms.setServiceParent(self)
        self.heartbeats = [
            HeartbeatLoop(reactor, self.client, address, self.heartbeat_params, interval)
            for address in explorers
        ]
        for loop in self.heartbeats:
            loop.setServiceParent(self)
        NodeMethods(self).register(self.rpc)

    def privilegedStartService(self):
        if self.node_id is None:
            self.node_id = load_node_id(self._state_dir)
        service.MultiService.privilegedStartService(self)

    def startService(self):
        if self.node_id is None:
            self.node_id = load_node_id(self._state_dir)
        log.info("node {node_id} ({name}) starting", node_id=self.node_id, name=self.name)
        service.MultiService.startService(self)

    def stopService(self):
        # Stop heartbeating first (a heartbeat arriving after our goodbye would bring us
        # back online), then say goodbye while the listeners still run: explorers mark
        # us offline at once instead of after NODE_OFFLINE_AFTER.
        for loop in self.heartbeats:
            loop.stopService()
        goodbyes = [
            self.client.call(loop.address, "explorer.leave", {"node_id": self.node_id},
                             timeout=LEAVE_TIMEOUT).addErrback(lambda f: None)
            for loop in self.heartbeats
            if loop.state.state == "ok"
        ]
        d = defer.gatherResults(goodbyes)
        d.addBoth(lambda _: service.MultiService.stopService(self))
        d.addBoth(lambda _: self.client.close())
        return d

    def advertised_address(self, explorer):
        """
        The address this node reports to an explorer: its Unix socket to an explorer
        reached over Unix, its TCP address to one reached over TCP (the configured
        advertise address, or the local IP towards that explorer with our TCP port).

        :param explorer: the explorer's L{Address}
        :return: an L{Address}
        """
        if explorer.is_unix:
            return self.unix_address
        if self._advertise is not None:
            return self._advertise
        port = self.tcp_port()
        # Our address on the very connection the heartbeat will travel: right with
        # several interfaces, policy routing, IPv6-only names, and whichever address
        # of a name the connection ended up using.
        # Bounded by the heartbeat attempt it is part of.
        d = self.client.local_host(explorer)
        d.addCallback(lambda ip: Address("tcp", host=ip, port=port))
        return d

    def tcp_port(self):
        """:return: the bound port of the node's TCP listener"""
        for uri in self.listeners.bound:
            if uri.startswith("tcp://"):
                return int(uri.rsplit(":", 1)[1])
        return self._tcp.port

    def heartbeat_params(self, explorer):
        """
        The params of a heartbeat to one explorer.

        :param explorer: the explorer's L{Address}
        :return: a Deferred of the params dict
        """
        d = defer.gatherResults([
            defer.maybeDeferred(self.advertised_address, explorer),
            defer.maybeDeferred(self.vms.list),
        ], consumeErrors=True)

        def params(results):
            address, vms = results
            return {
                "node_id": self.node_id,
                "socket_path": address.uri,
                "name": self.name,
                "version": hero_compute.__version__,
                "capacity": self.vms.capacity(),
                "usage": self.vms.usage(),
                "vm_count": len(vms),
            }

        d.addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
        return d.addCallback(params)


class NodeMethods:
    """
    The C{node.*} and C{vm.*} methods.

    :param node: the L{NodeService}
    """

    def __init__(self, node):
        self._node = node
        self._vms = node.vms

    def register(self, rpc):
        """Publish the methods on a :class:`~hero_compute.rpc.dispatch.Dispatcher`."""
        rpc.register("node.info", self.info)
        rpc.register("vm.create", self.create)
        rpc.register("vm.start", lambda vm_id: self._wire(self._vms.start(vm_id)))
        rpc.register("vm.stop", lambda vm_id, force=False: self._wire(self._vms.stop(vm_id, force)))
        rpc.register("vm.delete", lambda vm_id: self._vms.delete(vm_id))
        rpc.register("vm.get", lambda vm_id: self._wire(self._vms.get(vm_id)))
        rpc.register("vm.list", self.list)

    def _wire(self, d):
        return defer.maybeDeferred(lambda: d).addCallback(lambda vm: vm.to_wire())

    def create(self, name, vcpus, memory_mb, disk_gb, image=None):
        """Define a VM."""
        return self._wire(self._vms.create(name, vcpus, memory_mb, disk_gb, image))

    def list(self):
        """All VMs."""
        d = defer.maybeDeferred(self._vms.list)
        return d.addCallback(lambda vms: [vm.to_wire() for vm in vms])

    def info(self):
        """About this node."""
        node = self._node
        d = defer.maybeDeferred(self._vms.list)
        return d.addCallback(lambda vms: {
            "node_id": node.node_id,
            "name": node.name,
            "version": hero_compute.__version__,
            "capacity": self._vms.capacity(),
            "usage": self._vms.usage(),
            "vm_count": len(vms),
            "explorers": [loop.state.to_wire() for loop in node.heartbeats],
        })
