"""
The node's JSON-RPC methods (``node.*``, ``vm.*``): thin wrappers that turn the VM
manager's records into wire dicts.
"""

from twisted.internet import defer

import hero_compute


class NodeMethods:
    """
    The ``node.*`` and ``vm.*`` methods.

    :param node: the :class:`NodeService`
    """

    def __init__(self, node) -> None:
        self._node = node
        self._vms = node.vms

    def register(self, rpc) -> None:
        """Publish the methods on a :class:`~hero_compute.rpc.dispatch.Dispatcher`."""
        rpc.register("node.info", self.info)
        rpc.register("vm.create", self.create)
        rpc.register("vm.start", lambda vm_id: self._wire(self._vms.start(vm_id)))
        rpc.register(
            "vm.stop", lambda vm_id, force=False: self._wire(self._vms.stop(vm_id, force))
        )
        rpc.register("vm.delete", lambda vm_id: self._vms.delete(vm_id))
        rpc.register("vm.get", lambda vm_id: self._wire(self._vms.get(vm_id)))
        rpc.register("vm.list", self.list)
        if hasattr(self._vms, "console"):
            rpc.register(
                "vm.console_log",
                lambda vm_id, bytes=None: self._vms.console(vm_id).read(bytes),  # noqa: A002
            )

    def _wire(self, d):
        return defer.maybeDeferred(lambda: d).addCallback(lambda vm: vm.to_wire())

    def create(
        self,
        name,
        vcpus,
        memory_mb,
        disk_gb,
        image=None,
        ssh_keys=None,
        user_data=None,
        hostname=None,
        network=None,
        ports=None,
        boot=None,
    ):
        """Define a VM; the params after ``image`` are CONTRACT §8's, each optional."""
        access = {
            key: value
            for key, value in (
                ("ssh_keys", ssh_keys),
                ("user_data", user_data),
                ("hostname", hostname),
                ("network", network),
                ("ports", ports),
                ("boot", boot),
            )
            if value is not None
        }
        d = self._vms.create(name, vcpus, memory_mb, disk_gb, image, **access)
        return self._wire(d)

    def list(self):
        """All VMs."""
        d = defer.maybeDeferred(self._vms.list)
        return d.addCallback(lambda vms: [vm.to_wire() for vm in vms])

    def info(self):
        """About this node."""
        node = self._node
        d = defer.maybeDeferred(self._vms.list)
        return d.addCallback(
            lambda vms: {
                "node_id": node.node_id,
                "name": node.name,
                "version": hero_compute.__version__,
                "capacity": self._vms.capacity(),
                "usage": self._vms.usage(),
                "vm_count": len(vms),
                "labels": node.identity.labels,
                "explorers": [loop.state.to_wire() for loop in node.heartbeats],
                "accel": self._vms.accel(),
            }
        )
