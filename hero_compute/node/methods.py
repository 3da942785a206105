"""
The node's JSON-RPC methods (``node.*``, ``vm.*``): thin wrappers that turn the VM
manager's records into wire dicts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer

import hero_compute

if TYPE_CHECKING:
    from hero_compute.rpc.dispatch import Dispatcher


class NodeMethods:
    """
    The ``node.*`` and ``vm.*`` methods.

    :param node: the :class:`NodeService`
    """

    def __init__(self, node: Any) -> None:
        self._node = node
        self._vms = node.vms

    def register(self, rpc: Dispatcher) -> None:
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
        # Only a manager with serial consoles (QEMU's) has their logs.
        console = getattr(self._vms, "console", None)
        if console is not None:
            rpc.register(
                "vm.console_log",
                lambda vm_id, bytes=None: console(vm_id).read(bytes),  # noqa: A002
            )

    def _wire(self, d):
        return defer.maybeDeferred(lambda: d).addCallback(lambda vm: vm.to_wire())

    def create(
        self,
        name: str,
        vcpus: int,
        memory_mb: int,
        disk_gb: int,
        image: str | None = None,
        ssh_keys: list[str] | None = None,
        user_data: str | None = None,
        hostname: str | None = None,
        network: str | None = None,
        ports: list[dict[str, Any]] | None = None,
        boot: dict[str, Any] | None = None,
    ) -> defer.Deferred[dict[str, Any]]:
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

    def list(self) -> defer.Deferred[list[dict[str, Any]]]:
        """All VMs."""
        d = defer.maybeDeferred(self._vms.list)
        return d.addCallback(lambda vms: [vm.to_wire() for vm in vms])

    def info(self) -> defer.Deferred[dict[str, Any]]:
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
