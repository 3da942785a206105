"""
Admission of new VMs: whether a request is well-formed, whether its base image may be
used, and whether the node has room for it.

The bounds of a request (name, vCPUs, memory, disk) are those of ``vm.create`` in
``schemas/node/node.oschema`` and nowhere else: the dispatcher checks them on the wire,
and :func:`check_request` checks them with the same schema for callers that reach the
manager directly.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs

from hero_compute.rpc.errors import InvalidParams, InvalidVmState
from hero_compute.rpc.schema import load_schema

from .images import ImagePolicy

if TYPE_CHECKING:
    from hero_compute.node.vms import VmRecord
    from hero_compute.rpc.schema import Method


#: qcow2 with 64 KiB clusters needs 8 bytes of L2 table per cluster: 1/8192 of the
#: virtual size when the disk is fully allocated.
_QCOW2_METADATA_RATIO = 8192


@functools.cache
def create_method() -> Method:
    """:return: the schema's ``vm.create``, a :class:`~hero_compute.rpc.schema.Method`"""
    return load_schema("node").methods["vm.create"]


def check_request(
    name: str,
    vcpus: int,
    memory_mb: int,
    disk_gb: int,
    image: str | None = None,
    **access: Any,
) -> None:
    """
    Check a VM's definition against the schema's ``vm.create`` params; ``access`` holds
    the optional ones of CONTRACT §8 (``None`` for absent).

    :raise InvalidParams: naming what is wrong
    """
    for key, value in (("vcpus", vcpus), ("memory_mb", memory_mb), ("disk_gb", disk_gb)):
        # JSON Schema counts 2.0 as an integer; QEMU and qemu-img want "2".
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidParams(f"{key} must be an integer, not {value!r}")
    params = {"name": name, "vcpus": vcpus, "memory_mb": memory_mb, "disk_gb": disk_gb}
    if image is not None:
        params["image"] = image
    params.update({key: value for key, value in access.items() if value is not None})
    create_method().coerce_params(params)


@attrs.frozen
class Reservation:
    """
    What one defined VM, or one being defined, holds of the node: its name, and its
    CPUs, memory and disk even while it is stopped, so every defined VM can run at once
    (CONTRACT §9).
    """

    name: str
    memory_mb: int
    disk_gb: int
    vcpus: int = 0

    @classmethod
    def of(cls, record: VmRecord) -> Reservation:
        """
        :param record: a :class:`~hero_compute.node.vms.VmRecord`
        :return: what that VM holds
        """
        return cls(record.name, record.memory_mb, record.disk_gb, record.vcpus)


@attrs.frozen
class Admission:
    """
    The node's policy for new VMs.

    CPUs, memory and disk are reserved when a VM is *defined*, so every defined VM can
    run at once: a create is refused (-32005) when the CPUs, memory or disks of all
    defined VMs would exceed the node's capacity (``NODE_CAPACITY``, by default the
    host's; ``memory_limit_mb`` and ``disk_limit_gb`` override it).  Disks are sparse qcow2
    files, so they do not take their size at once; a create is also refused when the
    state directory's filesystem has less free space than ``min_free_mb`` plus the
    metadata the new disk needs when fully written (1/8192 of its size): the VM could
    not even start to fill its disk, and the node would be the first to run out of
    space.  Base images are :class:`~.images.ImagePolicy`'s business.

    :ivar state_dir: the state directory, whose filesystem holds the disks
    :ivar memory_limit_mb: memory for all defined VMs together; ``None``: the host's
    :ivar disk_limit_gb: disk for all defined VMs together; ``None``: the size of the
        state directory's filesystem
    :ivar min_free_mb: free space the state directory's filesystem must keep
    :ivar images: the base images allowed, an :class:`~.images.ImagePolicy`
    """

    state_dir: str
    memory_limit_mb: int | None = None
    disk_limit_gb: int | None = None
    min_free_mb: int = 256
    images: ImagePolicy = attrs.field(kw_only=True)

    def admit(
        self,
        request: Reservation,
        vcpus: int,
        image: str | None,
        held: Iterable[Reservation],
        host: dict[str, int],
    ) -> str | None:
        """
        Decide whether a VM the schema accepts may be defined here.

        :param request: the new VM's :class:`Reservation`
        :param vcpus: its virtual CPUs
        :param image: its base image path, or ``None``
        :param held: the :class:`Reservation`\\ s of every VM defined or being defined
        :param host: the node's capacity: :func:`host_capacity` with ``NODE_CAPACITY``
            over it
        :return: the resolved image path, per :meth:`~.images.ImagePolicy.resolve`, or
            ``None``
        :raise InvalidParams: a relative or missing image
        :raise RefusedByPolicy: an image outside the image directories
        :raise InvalidVmState: a taken name, or not enough CPUs, memory or disk
        """
        cpu_used = sum(r.vcpus for r in held)
        if cpu_used + vcpus > host["vcpus"]:
            raise InvalidVmState(
                f"not enough vcpus: {vcpus} asked, {max(host['vcpus'] - cpu_used, 0)} of "
                f"{host['vcpus']} left for VMs on this node"
            )
        image = self.images.resolve(image)
        if request.name in {r.name for r in held}:
            raise InvalidVmState(f"a VM named {request.name!r} already exists on this node")
        mem_used = sum(r.memory_mb for r in held)
        disk_used = sum(r.disk_gb for r in held)
        mem_limit = (
            host["memory_mb"] if self.memory_limit_mb is None else self.memory_limit_mb
        )
        disk_limit = host["disk_gb"] if self.disk_limit_gb is None else self.disk_limit_gb
        if mem_used + request.memory_mb > mem_limit:
            raise InvalidVmState(
                f"not enough memory: {request.memory_mb} MB asked, "
                f"{max(mem_limit - mem_used, 0)} MB of {mem_limit} MB left for VMs on "
                f"this node"
            )
        if disk_used + request.disk_gb > disk_limit:
            raise InvalidVmState(
                f"not enough disk: {request.disk_gb} GB asked, "
                f"{max(disk_limit - disk_used, 0)} GB of {disk_limit} GB left for VMs on "
                f"this node"
            )
        st = os.statvfs(_existing(self.state_dir))
        free_mb = st.f_bavail * st.f_frsize // 1024**2
        needed_mb = self.min_free_mb + -(-request.disk_gb * 1024 // _QCOW2_METADATA_RATIO)
        if free_mb < needed_mb:
            raise InvalidVmState(
                f"not enough free space in {self.state_dir}: {free_mb} MB free, "
                f"{needed_mb} MB needed for a {request.disk_gb} GB disk"
            )
        return image


def host_capacity(state_dir: str) -> dict[str, int]:
    """
    :param state_dir: the node's state directory
    :return: the host's ``{vcpus, memory_mb, disk_gb}``: CPUs, ``MemTotal`` and the size
        of the state directory's filesystem, in whole units
    """
    st = os.statvfs(_existing(state_dir))
    return {
        "vcpus": os.cpu_count() or 1,
        "memory_mb": _mem_total_kb() // 1024,
        "disk_gb": st.f_blocks * st.f_frsize // 1024**3,
    }


def _existing(path):
    """:return: ``path`` or its nearest existing parent, for filesystem statistics"""
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _mem_total_kb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    raise RuntimeError("no MemTotal in /proc/meminfo")
