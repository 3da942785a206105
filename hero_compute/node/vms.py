"""
The VM manager seam: what the node's RPC methods need from whatever runs VMs.

:obj:`IVmManager` is implemented for real by :obj:`hero_compute.node.qemu.QemuVmManager`
(QEMU processes driven over QMP) and, for fast tests, by ``tests.fakes.MemoryVmManager``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
from zope.interface import Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

#: The states of a VM, as on the wire.
STATES = ("stopped", "starting", "running", "stopping", "error")
#: The kernel command line of a direct kernel boot that gives none.
DEFAULT_CMDLINE = "console=ttyS0"


def mac_address(vm_id: str) -> str:
    """
    :param vm_id: a VM id
    :return: the VM's stable MAC address, ``52:54:00:xx:xx:xx`` (QEMU's locally
        administered prefix) from a hash of its id
    """
    tail = hashlib.sha256(vm_id.encode()).digest()[:3]
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def default_hostname(name: str) -> str:
    """
    :param name: a VM name
    :return: the host name a VM of that name gets when none is given: lower-cased, every
        other character as ``-``, cut to one 63-character label, never empty
    """
    label = re.sub(r"[^a-z0-9-]", "-", name.lower())[:63].strip("-")
    return label or "vm"


@attrs.frozen
class PortForward:
    """
    One port forward of a ``nat`` VM: ``address:host`` on the node reaches ``guest``.
    """

    guest: int
    host: int
    protocol: str = "tcp"
    address: str = "127.0.0.1"


@attrs.frozen
class VmNetwork:
    """
    How a VM reaches the network.

    :ivar mode: ``nat``, ``none`` or ``bridge:<name>``
    :ivar mac: its NIC's MAC address
    :ivar ports: :class:`PortForward` s, with ``nat``
    """

    mode: str
    mac: str
    ports: tuple = ()

    @property
    def bridge(self) -> str | None:
        """The bridge's name in ``bridge`` mode, else ``None``."""
        return self.mode.partition(":")[2] if self.mode.startswith("bridge:") else None

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> VmNetwork:
        """:return: the network of a VmInfo's ``network``"""
        ports = tuple(PortForward(**p) for p in data.get("ports", ()))
        return cls(data["mode"], data["mac"], ports)


@attrs.frozen
class BootSpec:
    """
    Direct kernel boot: resolved paths under the image directories, and the command
    line.
    """

    kernel: str
    initrd: str | None = None
    cmdline: str = DEFAULT_CMDLINE


@attrs.frozen
class VmRecord:
    """
    One VM's definition and state, as reported by ``vm.get`` (VmInfo).

    :ivar vm_id: stable id
    :ivar state: one of :obj:`STATES`
    :ivar created_at: Unix seconds
    :ivar hostname: the guest's host name
    :ivar network: its :class:`VmNetwork` (by default none, as VMs defined before
        networks had)
    :ivar ssh_keys: fingerprints of its SSH keys; the keys and the user data live
        beside the definition, never in it
    :ivar boot: a :class:`BootSpec`, or ``None`` to boot from the disk
    """

    vm_id: str
    name: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    image: str | None
    state: str
    created_at: float
    hostname: str = attrs.field(
        default=attrs.Factory(lambda self: default_hostname(self.name), takes_self=True)
    )
    network: VmNetwork = attrs.field(
        default=attrs.Factory(
            lambda self: VmNetwork("none", mac_address(self.vm_id)), takes_self=True
        )
    )
    ssh_keys: tuple = ()
    boot: BootSpec | None = None

    def to_wire(self) -> dict[str, Any]:
        """:return: the VmInfo dict (JSON arrays as lists)"""
        return attrs.asdict(self, value_serializer=_lists)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> VmRecord:
        """
        :param data: a VmInfo dict (checked already), possibly from before networks
        :return: the record
        """
        fields = {a.name: data[a.name] for a in attrs.fields(cls) if a.name in data}
        if fields.get("network") is not None:
            fields["network"] = VmNetwork.from_wire(fields["network"])
        else:
            fields.pop("network", None)
        if fields.get("boot") is not None:
            fields["boot"] = BootSpec(**fields["boot"])
        fields["ssh_keys"] = tuple(fields.get("ssh_keys", ()))
        return cls(**fields)


def _lists(instance, field, value):
    return list(value) if isinstance(value, tuple) else value


class IVmManager(Interface):
    """
    Runs the VMs of one node.  Every method returns a Deferred (or a value) and raises
    :obj:`VmNotFound` (-32004) for unknown ids and :obj:`InvalidVmState` (-32005) for an
    operation the VM's state, or the node's capacity, does not allow.
    """

    def create(
        name: str,
        vcpus: int,
        memory_mb: int,
        disk_gb: int,
        image: str | None = None,
        **access: Any,
    ) -> Deferred[VmRecord]:
        """
        Define a VM and its disk; returns its :obj:`VmRecord`, state ``stopped``.
        ``access`` holds the optional ``vm.create`` params of CONTRACT §8
        (``ssh_keys``, ``user_data``, ``hostname``, ``network``, ``ports``, ``boot``).
        """

    def start(vm_id: str) -> Deferred[VmRecord]:
        """Start a stopped (or errored) VM; returns its :obj:`VmRecord`."""

    def stop(vm_id: str, force: bool = False) -> Deferred[VmRecord]:
        """Stop a running VM; returns its :obj:`VmRecord`."""

    def delete(vm_id: str) -> Deferred[bool]:
        """Stop if needed and delete a VM with its disk; returns True."""

    def get(vm_id: str) -> Deferred[VmRecord]:
        """Returns one :obj:`VmRecord`."""

    def list() -> Deferred[list[VmRecord]]:
        """Returns all :obj:`VmRecord`s."""

    def capacity() -> dict[str, int]:
        """Returns what VMs may reserve in all, ``{vcpus, memory_mb, disk_gb}``."""

    def usage() -> dict[str, int]:
        """Returns the ``{vcpus, memory_mb, disk_gb}`` given to this node's VMs."""

    def accel() -> str:
        """Returns the accelerator VMs run under: ``kvm``, ``tcg`` or ``probing``."""


def usage_of(vms: Iterable[VmRecord]) -> dict[str, int]:
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
