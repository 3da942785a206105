"""
The VM manager seam: what the node's RPC methods need from whatever runs VMs.

:obj:`IVmManager` is implemented for real by :obj:`hero_compute.node.qemu.QemuVmManager`
(QEMU processes driven over QMP) and, for fast tests, by ``tests.fakes.MemoryVmManager``.
"""

import attrs
from zope.interface import Interface

#: The states of a VM, as on the wire.
STATES = ("stopped", "starting", "running", "stopping", "error")


@attrs.frozen
class VmRecord:
    """
    One VM's definition and state, as reported by ``vm.get`` (VmInfo).

    :ivar vm_id: stable id
    :ivar state: one of :obj:`STATES`
    :ivar created_at: Unix seconds
    """

    vm_id: str
    name: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    image: str | None
    state: str
    created_at: float

    def to_wire(self):
        """:return: the VmInfo dict"""
        return attrs.asdict(self)


class IVmManager(Interface):
    """
    Runs the VMs of one node.  Every method returns a Deferred (or a value) and raises
    :obj:`VmNotFound` (-32004) for unknown ids and :obj:`InvalidVmState` (-32005) for an
    operation the VM's state, or the node's capacity, does not allow.
    """

    def create(name, vcpus, memory_mb, disk_gb, image=None):
        """Define a VM and its disk; returns its :obj:`VmRecord`, state ``stopped``."""

    def start(vm_id):
        """Start a stopped (or errored) VM; returns its :obj:`VmRecord`."""

    def stop(vm_id, force=False):
        """Stop a running VM; returns its :obj:`VmRecord`."""

    def delete(vm_id):
        """Stop if needed and delete a VM with its disk; returns True."""

    def get(vm_id):
        """Returns one :obj:`VmRecord`."""

    def list():
        """Returns all :obj:`VmRecord`s."""

    def capacity():
        """Returns what VMs may reserve in all, ``{vcpus, memory_mb, disk_gb}``."""

    def usage():
        """Returns the ``{vcpus, memory_mb, disk_gb}`` given to this node's VMs."""


def usage_of(vms):
    """
    The resources reserved by VMs: those of every defined VM, running or stopped, so
    every defined VM can run at once (CONTRACT §9).

    :param vms: :obj:`VmRecord`s
    :return: ``{vcpus, memory_mb, disk_gb}``
    """
    vcpus = memory_mb = disk_gb = 0
    for vm in vms:
        vcpus += vm.vcpus
        memory_mb += vm.memory_mb
        disk_gb += vm.disk_gb
    return {"vcpus": vcpus, "memory_mb": memory_mb, "disk_gb": disk_gb}
