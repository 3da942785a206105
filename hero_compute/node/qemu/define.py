"""
Defining a VM (``vm.create``): admission against what is held and what is being
created, its network plan, its directory and secrets, its disk, then its record.
:class:`~.manager.QemuVmManager` runs it and keeps the VM that comes out.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from hero_compute.node.vms import VmRecord

from . import access
from .admission import Admission, Reservation, check_request
from .disks import create_disk
from .store import DISK, VmStore

if TYPE_CHECKING:
    from hero_compute.node.vms import VmRecord


@attrs.frozen
class Definer:
    """
    What a definition reads and writes of its manager.

    :ivar reactor: provides ``IReactorProcess`` and ``IReactorTime``
    :ivar qemu_img: the ``qemu-img`` tool to make disks with
    :ivar store: the :class:`~.store.VmStore`
    :ivar admission: the :class:`~.admission.Admission`
    :ivar access: the :class:`~.access.AccessPolicy`
    :ivar vms: VM id -> :class:`~.machine.Machine`, the VMs defined
    :ivar creating: VM id -> (reservation, plan) of the creates still running
    :ivar capacity: :meth:`~.manager.QemuVmManager.capacity`
    """

    reactor: Any
    qemu_img: str
    store: VmStore
    admission: Admission
    access: access.AccessPolicy
    vms: dict
    creating: dict
    capacity: Callable[[], dict]


async def define_vm(
    where: Definer,
    name: str,
    vcpus: int,
    memory_mb: int,
    disk_gb: int,
    image: str | None,
    params: dict[str, Any],
) -> VmRecord:
    """
    Admit, plan and make a VM; its reservation holds while its disk is made.

    :param where: the :class:`Definer`
    :param params: as :meth:`.access.AccessPolicy.plan`
    :return: its :class:`~hero_compute.node.vms.VmRecord`, state ``stopped``
    """
    check_request(name, vcpus, memory_mb, disk_gb, image, **params)
    request = Reservation(name, memory_mb, disk_gb, vcpus)
    held = [Reservation.of(vm.record) for vm in where.vms.values()]
    held += [r for r, _ in where.creating.values()]
    image = where.admission.admit(request, vcpus, image, held, where.capacity())
    vm_id = uuid.uuid4().hex
    networks = [vm.record.network for vm in where.vms.values()]
    networks += [a.fields["network"] for _, a in where.creating.values()]
    planned = where.access.plan(vm_id, name, access.held_ports(networks), **params)
    where.creating[vm_id] = (request, planned)
    try:
        directory = where.store.make_directory(vm_id)
        access.save_secrets(directory, planned.secrets)
        await create_disk(
            where.reactor, where.qemu_img, os.path.join(directory, DISK), disk_gb, image
        )
        record = VmRecord(
            vm_id,
            name,
            vcpus,
            memory_mb,
            disk_gb,
            image,
            "stopped",
            where.reactor.seconds(),
            **planned.fields,
        )
        where.store.save(record)
    except BaseException:
        where.store.discard(vm_id)
        raise
    finally:
        del where.creating[vm_id]
    return record
