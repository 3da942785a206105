"""
The real VM manager: one ``qemu-system-x86_64`` process per running VM, driven over QMP.

Layout of the state directory (all ours; nothing else writes there)::

    <state_dir>/vms/<vm_id>/vm.json     the definition (VmInfo plus nothing else)
    <state_dir>/vms/<vm_id>/disk.qcow2  the VM's disk
    <state_dir>/vms/<vm_id>/qemu.pid    pid of its QEMU, while it runs
    <state_dir>/vms/<vm_id>/qmp.sock    its QMP socket, while it runs
    <state_dir>/images/                 base images, unless NODE_IMAGE_DIRS says otherwise

VM directories are 0700 and disks 0600, whatever the umask.

Modules: :mod:`.manager` (the lifecycle and VM states, :class:`QemuVmManager`),
:mod:`.machine` (one VM's QEMU over QMP: launch, attach, shut down), :mod:`.process`
(QEMU's command line, finding and ending its process), :mod:`.store` (definitions on
disk), :mod:`.admission` (what may be defined, bounds from the node schema),
:mod:`.images` (which base images may be used) and :mod:`.disks` (``qemu-img``).
"""

from .admission import Admission, Reservation, check_request, host_capacity
from .images import ImagePolicy
from .manager import QemuVmManager
from .process import process_alive
from .store import VmStore

__all__ = [
    "Admission",
    "ImagePolicy",
    "QemuVmManager",
    "Reservation",
    "VmStore",
    "check_request",
    "host_capacity",
    "process_alive",
]
