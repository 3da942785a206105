"""
Which VM manager a node runs.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from .qemu import QemuVmManager

if TYPE_CHECKING:
    from .qemu.console import ConsoleSettings
    from .qemu.manager import QemuVmManager
    from .qemu.network import NetworkPolicy


log = Logger()


def make_vm_manager(
    reactor: Any,
    state_dir: str,
    image_dirs: Sequence[str] | None = None,
    capacity: dict[str, int] | None = None,
    accel: str = "auto",
    network: NetworkPolicy | None = None,
    console: ConsoleSettings | None = None,
) -> QemuVmManager:
    """
    The node's VM manager: QEMU processes driven over QMP, kept under the state dir.

    A node without QEMU installed still starts (and warns): its VM methods then fail
    with a clear error, while heartbeats and the rest keep working.

    :param reactor: the reactor
    :param state_dir: the node's state directory
    :param image_dirs: directories base images must lie under; ``None`` or empty (no
        ``NODE_IMAGE_DIRS``): ``<state_dir>/images`` only
    :param capacity: ``NODE_CAPACITY``: what VMs may reserve in all, any of
        ``vcpus``, ``memory_mb``, ``disk_gb`` (the host's for the others), or None
    :param accel: ``NODE_ACCEL``: ``auto``, ``kvm`` or ``tcg``
    :param network: the :class:`~hero_compute.node.qemu.network.NetworkPolicy`, or
        ``None`` for the defaults
    :param console: the :class:`~hero_compute.node.qemu.console.ConsoleSettings`, or
        None for the defaults
    :return: a :class:`~hero_compute.node.qemu.QemuVmManager`
    """
    missing = [
        tool for tool in ("qemu-system-x86_64", "qemu-img") if not shutil.which(tool)
    ]
    if missing:
        log.warn(
            "{missing} not found: this node cannot run VMs "
            "(apt-get install qemu-system-x86 qemu-utils)",
            missing=" and ".join(missing),
        )
    extra: dict[str, Any] = {} if network is None else {"network": network}
    if console is not None:
        extra["console"] = console
    return QemuVmManager(
        reactor=reactor,
        state_dir=state_dir,
        image_dirs=image_dirs or None,
        capacity_cap=capacity or {},
        accel=accel,
        **extra,
    )
