"""
QEMU processes: the command line of a VM, finding its process again by pid file, and
ending it.

QEMU is started with ``-daemonize``, so it is not our child: like libvirt, stopping the
node leaves VMs running, and the next start of the node finds them again by pid file and
QMP socket.  Nothing here reaps: a zombie is its real parent's business.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Any

from twisted.internet import task

from hero_compute.rpc.errors import InvalidVmState

from .console import TTY_SOCKET, serial_args
from .network import netdev_args
from .seed import SEED
from .store import DISK, PIDFILE, QMP_SOCKET
from .tools import ToolTimeout, run

if TYPE_CHECKING:
    from hero_compute.node.vms import VmRecord


def qemu_argv(record: VmRecord, directory: str, accel: str) -> list[str]:
    """
    The arguments (after the executable) that run one VM, daemonized, with a QMP socket.

    Built from parts (:func:`machine_args`, :func:`disk_args`, :func:`boot_args`,
    :func:`network.netdev_args <.network.netdev_args>`, :func:`control_args`), so a
    feature adds its own part.

    :param record: the VM's :class:`~hero_compute.node.vms.VmRecord`
    :param directory: the VM's directory
    :param accel: QEMU's accelerator list, e.g. ``"kvm:tcg"``
    :return: a list of strings
    """
    return [
        *machine_args(record, accel),
        *disk_args(record, directory),
        *boot_args(record),
        *netdev_args(record.vm_id, record.network),
        *serial_args(directory),
        *control_args(directory),
    ]


def machine_args(record: VmRecord, accel: str) -> list[str]:
    """:return: the machine, its memory and CPUs, and no default devices"""
    return [
        "-name",
        "guest=" + opt(record.name),
        "-machine",
        f"accel={opt(accel)}",
        "-m",
        str(record.memory_mb),
        "-smp",
        str(record.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]


def disk_args(record: VmRecord, directory: str) -> list[str]:
    """:return: the VM's disk, and its NoCloud seed read-only when one is written"""
    args = ["-drive", f"file={opt(os.path.join(directory, DISK))},format=qcow2,if=virtio"]
    seed = os.path.join(directory, SEED)
    if os.path.exists(seed):
        args += ["-drive", f"file={opt(seed)},format=raw,if=virtio,readonly=on"]
    return args


def boot_args(record: VmRecord) -> list[str]:
    """:return: a direct kernel boot's kernel, initrd and command line, if any"""
    boot = record.boot
    if boot is None:
        return []
    args = ["-kernel", boot.kernel]
    if boot.initrd is not None:
        args += ["-initrd", boot.initrd]
    return args + ["-append", boot.cmdline]


def control_args(directory: str) -> list[str]:
    """:return: daemonizing, the pid file and the QMP socket"""
    return [
        "-daemonize",
        "-pidfile",
        os.path.join(directory, PIDFILE),
        "-qmp",
        _qmp_option(directory),
    ]


def _qmp_option(directory) -> str:
    return f"unix:{opt(os.path.join(directory, QMP_SOCKET))},server=on,wait=off"


async def daemonize(
    reactor: Any, qemu: str, argv: list[str], directory: str, timeout: float
) -> None:
    """
    Run QEMU until it has daemonized.

    :param reactor: provides ``IReactorProcess`` and ``IReactorTime``
    :param qemu: the QEMU system emulator
    :param argv: its arguments, from :func:`qemu_argv`
    :param directory: the VM's directory, QEMU's working directory
    :param timeout: seconds QEMU may take
    :raise InvalidVmState: when QEMU fails, with its last line of output
    """
    try:
        out, err, code = await run(reactor, qemu, argv, timeout, path=directory)
    except ToolTimeout:
        raise InvalidVmState(
            f"QEMU could not start VM {os.path.basename(directory)} within {timeout:g} s"
        ) from None
    if code != 0:
        raise InvalidVmState(
            f"QEMU could not start VM {os.path.basename(directory)}: "
            f"{last_line(err or out)}"
        )


def find_pid(directory: str) -> int | None:
    """
    :param directory: a VM's directory
    :return: the pid in the VM's pid file if that process is alive and really is this
        VM's QEMU (pids get reused), else ``None``
    """
    try:
        with open(os.path.join(directory, PIDFILE)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    # A zombie has an empty command line, and the socket path is unique to this VM.
    if b"-qmp" not in argv or os.fsencode(_qmp_option(directory)) not in argv:
        return None
    if not os.path.basename(argv[0]).startswith(b"qemu"):
        return None
    return pid


def process_alive(pid: int) -> bool:
    """
    :param pid: a process id
    :return: whether any of its threads still runs
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The state letter follows the command name, which is in parentheses and may
        # hold spaces.  The leader turns zombie while other threads are still exiting
        # and holding the disk's lock, so only all threads dead is gone; a zombie is not
        # ours to reap (QEMU daemonized away from us).
        if stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X"):
            return True
    return False


def kill(pid: int) -> None:
    """
    SIGKILL a process that may already be gone.

    :param pid: a process id
    """
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def wait_gone(reactor: Any, pid: int, timeout: float) -> bool:
    """
    :param reactor: provides ``IReactorTime``
    :param pid: a process id
    :param timeout: seconds to wait at most
    :return: whether process ``pid`` ended (or became a zombie) in time
    """
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        await task.deferLater(reactor, 0.05, lambda: None)
    return True


def remove_runtime(directory: str) -> None:
    """
    Remove a VM's pid file and QMP socket, which only a running QEMU needs.

    :param directory: the VM's directory
    """
    for name in (PIDFILE, QMP_SOCKET, TTY_SOCKET):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass


def last_line(output: bytes) -> str:
    """
    :param output: a tool's output, bytes
    :return: its last non-blank line, for an error message
    """
    lines = [
        line for line in output.decode("utf-8", "replace").splitlines() if line.strip()
    ]
    return lines[-1].strip() if lines else "no output"


def opt(value: str) -> str:
    """
    :param value: a value for QEMU's comma-separated option syntax
    :return: it, with commas escaped
    """
    return value.replace(",", ",,")
