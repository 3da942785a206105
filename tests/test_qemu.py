"""
Tests for :class:`hero_compute.node.qemu.QemuVmManager` against real QEMU processes.

The VMs are tiny (64 MB, 1 vCPU, 1 GB sparse disk) and boot nothing: SeaBIOS sits
there, which is enough for QMP to report them running.  Nothing honours the ACPI
power-down, so a graceful stop always waits out the (short) grace period.

They run under TCG (KVM hangs guests on some hosts whose /dev/kvm opens); set
``HERO_TEST_QEMU_ACCEL=auto`` or ``kvm`` to try KVM.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import pytest_twisted
from twisted.application.service import IService
from twisted.internet import defer, reactor, task
from zope.interface.verify import verifyObject

from hero_compute.node.qemu import QemuVmManager, check_request, process_alive
from hero_compute.node.qemu.store import record_from_wire
from hero_compute.node.vms import IVmManager
from hero_compute.rpc.errors import InvalidParams, InvalidVmState, VmNotFound
from hero_compute.rpc.schema import load_schema

HAVE_QEMU = bool(shutil.which("qemu-system-x86_64") and shutil.which("qemu-img"))
needs_qemu = pytest.mark.skipif(
    not HAVE_QEMU,
    reason="qemu-system-x86_64 and qemu-img are not installed "
    "(apt-get install qemu-system-x86 qemu-utils)",
)
pytestmark = pytest.mark.qemu

#: Bound on any single wait in these tests.
WAIT = 20


def within(d, seconds=WAIT):
    """
    :param d: a Deferred
    :param seconds: how long it may take
    :return: ``d``, failing with a timeout after ``seconds``
    """
    return defer.ensureDeferred(d).addTimeout(seconds, reactor)


async def sleep(seconds):
    """:param seconds: how long to let the reactor run"""
    await task.deferLater(reactor, seconds, lambda: None)


def pid_of(state_dir, vm_id):
    """
    :param state_dir: the manager's state directory
    :param vm_id: a VM
    :return: the pid in its pid file
    """
    with open(os.path.join(state_dir, "vms", vm_id, "qemu.pid")) as f:
        return int(f.read())


def is_qemu(pid):
    """
    :param pid: a process id
    :return: whether it is a live qemu-system process
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"qemu-system" in f.read().split(b"\0")[0] and process_alive(pid)
    except OSError:
        return False


def entries(state_dir):
    """
    :param state_dir: the manager's state directory
    :return: the names under its ``vms`` directory
    """
    path = os.path.join(state_dir, "vms")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


@pytest.fixture
def state_dir(short_tmp):
    """
    A short temporary state directory (QMP socket paths must fit in 107 bytes); every
    QEMU that left a pid file there is killed at the end, whatever the test did.
    """
    path = short_tmp
    yield path
    killed = []
    for vm_id in entries(path):
        try:
            pid = pid_of(path, vm_id)
        except (OSError, ValueError):
            continue
        if is_qemu(pid):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    deadline = time.monotonic() + 5
    while any(process_alive(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture
def managers(state_dir):
    """
    Make started managers on ``state_dir``: ``managers(**kwargs)``.  At the end all their
    QEMUs are killed and the services stopped.
    """
    made = []

    def make(**kwargs):
        kwargs.setdefault("stop_grace", 1.0)
        kwargs.setdefault("start_timeout", 15.0)
        kwargs.setdefault("accel", os.environ.get("HERO_TEST_QEMU_ACCEL", "tcg"))
        manager = QemuVmManager(reactor=reactor, state_dir=state_dir, **kwargs)
        manager.startService()
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.kill_all()
        if manager.running:
            pytest_twisted.blockon(within(manager.stopService(), 10))


async def create(manager, name="vm", **kwargs):
    """
    :param manager: a :obj:`QemuVmManager`
    :param name: the VM's name
    :return: the record of a new tiny VM
    """
    spec = {"vcpus": 1, "memory_mb": 64, "disk_gb": 1}
    spec.update(kwargs)
    return await within(manager.create(name, **spec))


async def wait_state(manager, vm_id, state, seconds=WAIT):
    """
    Wait until a VM reaches ``state``.

    :param manager: a :obj:`QemuVmManager`
    :param vm_id: the VM
    :param state: the state to wait for
    :param seconds: how long to wait at most
    :return: its record
    """
    deadline = time.monotonic() + seconds
    while True:
        record = await manager.get(vm_id)
        if record.state == state:
            return record
        assert time.monotonic() < deadline, f"VM still {record.state}, not {state}"
        await sleep(0.05)


async def wait_gone(pid, seconds=10):
    """
    :param pid: a process id
    :param seconds: how long to wait at most
    :return: whether the process ended in time
    """
    deadline = time.monotonic() + seconds
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        await sleep(0.05)
    return True


async def fails_with(d, error_type):
    """
    :param d: a Deferred
    :param error_type: the exception it must fail with
    :return: the exception
    """
    with pytest.raises(error_type) as info:
        await within(d)
    return info.value


# -- without QEMU: validation, capacity -------------------------------------------------


def test_interfaces(state_dir):
    """QemuVmManager provides IVmManager and is a service."""
    manager = QemuVmManager(reactor=reactor, state_dir=state_dir)
    assert verifyObject(IVmManager, manager)
    assert verifyObject(IService, manager)


def test_capacity_from_host(state_dir):
    """Capacity is the host's CPUs, MemTotal and the state filesystem's size, in whole
    units."""
    manager = QemuVmManager(reactor=reactor, state_dir=state_dir)
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    st = os.statvfs(state_dir)
    assert manager.capacity() == {
        "vcpus": os.cpu_count(),
        "memory_mb": mem_kb // 1024,
        "disk_gb": st.f_blocks * st.f_frsize // 1024**3,
    }
    assert manager.usage() == {"vcpus": 0, "memory_mb": 0, "disk_gb": 0}


def test_state_dir_too_long():
    """A state directory too long for QMP socket paths is refused at construction."""
    with pytest.raises(ValueError, match="too long"):
        QemuVmManager(reactor=reactor, state_dir="/tmp/" + "x" * 80)


@pytest.mark.parametrize(
    "spec",
    [
        {"vcpus": -1},
        {"vcpus": 0},
        {"memory_mb": -64},
        {"memory_mb": 1},
        {"disk_gb": 0},
        {"disk_gb": -5},
        {"disk_gb": 1.5},
        {"vcpus": True},
        {"memory_mb": "64"},
        {"name": ""},
        {"name": "a\nb"},
        {"name": 7},
        {"image": "relative/base.qcow2"},
        {"image": "images/nonexistent.qcow2"},
        {"vcpus": 100000},
        {"memory_mb": 10**9},
        {"disk_gb": 10**9},
        {"name": "x" * 65},
        {"name": "has space"},
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_input(managers, state_dir, spec):
    """
    Malformed parameters (sizes out of the schema's bounds or fractional, bad names,
    relative image, or one missing from the image directory) are InvalidParams and
    leave nothing behind.

    :param spec: the bad part of the request
    """
    manager = managers()
    request = {"name": "vm", "vcpus": 1, "memory_mb": 64, "disk_gb": 1}
    request.update(spec)
    if request.get("image", "").startswith("images/"):
        request["image"] = os.path.join(state_dir, request["image"])
    name = request.pop("name")
    await fails_with(manager.create(name, **request), InvalidParams)
    assert entries(state_dir) == []
    assert await manager.list() == []


def _create_param(name):
    """:return: the node schema's JSON Schema of one ``vm.create`` param"""
    params = load_schema("node").methods["vm.create"].params
    return next(p.schema for p in params if p.name == name)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"vcpus": os.cpu_count() + 1}, "vcpus"),
        ({"memory_mb": _create_param("memory_mb")["maximum"]}, "not enough memory"),
        ({"disk_gb": _create_param("disk_gb")["maximum"]}, "not enough disk"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_absurd_sizes(managers, state_dir, spec, match):
    """
    Sizes the schema allows but beyond the host (by default the limits) are refused with
    InvalidVmState.

    :param spec: the excessive part of the request
    :param match: what the message must say
    """
    manager = managers()
    key, value = next(iter(spec.items()))
    if value > _create_param(key)["maximum"] or value <= manager.capacity()[key]:
        pytest.skip(f"this host's {key} is not between the request and the schema's bound")
    request = {"vcpus": 1, "memory_mb": 64, "disk_gb": 1}
    request.update(spec)
    err = await fails_with(manager.create("vm", **request), InvalidVmState)
    assert match in err.message
    assert entries(state_dir) == []


_BOUNDS = [
    (name, keyword)
    for name in ("name", "vcpus", "memory_mb", "disk_gb")
    for keyword in ("minimum", "maximum", "minLength", "maxLength")
    if keyword in _create_param(name)
]


def test_schema_has_bounds():
    """Every size and the name of vm.create are bounded in the schema."""
    assert {name for name, _ in _BOUNDS} == {"name", "vcpus", "memory_mb", "disk_gb"}


@pytest.mark.parametrize("param, keyword", _BOUNDS)
def test_bounds_are_the_schemas(param, keyword):
    """
    The manager's bounds on a new VM are exactly vm.create's in the node schema: a
    value at the schema's bound is accepted, one past it is InvalidParams.

    :param param: a vm.create param
    :param keyword: the JSON Schema keyword of one of its bounds
    """
    bound = _create_param(param)[keyword]
    at, past = {
        "minimum": (bound, bound - 1),
        "maximum": (bound, bound + 1),
        "minLength": ("a" * bound, "a" * (bound - 1)),
        "maxLength": ("a" * bound, "a" * (bound + 1)),
    }[keyword]
    request = {"name": "vm", "vcpus": 1, "memory_mb": 64, "disk_gb": 1}
    check_request(**dict(request, **{param: at}))
    with pytest.raises(InvalidParams, match=param):
        check_request(**dict(request, **{param: past}))


def test_loaded_records_follow_the_schema():
    """A stored definition is loaded only if it is a VmInfo by the node schema."""
    good = {
        "vm_id": "0" * 32,
        "name": "old name, from before",
        "vcpus": 1,
        "memory_mb": 16,
        "disk_gb": 1,
        "image": None,
        "state": "stopped",
        "created_at": 1.0,
    }
    upgraded = record_from_wire(good).to_wire()
    assert {k: upgraded[k] for k in good} == good
    assert upgraded["hostname"] == "old-name--from-before"
    assert upgraded["network"]["mode"] == "none" and upgraded["boot"] is None
    for bad in ({"memory_mb": "16"}, {"state": "paused"}, {"vcpus": 0}):
        with pytest.raises(ValueError, match="not a VmInfo"):
            record_from_wire(dict(good, **bad))


@pytest_twisted.ensureDeferred
async def test_unknown_ids(managers):
    """Every operation on an unknown id is VmNotFound."""
    manager = managers()
    for call in (manager.get, manager.start, manager.stop, manager.delete):
        await fails_with(call("0" * 32), VmNotFound)
    await fails_with(manager.stop("nope", force=True), VmNotFound)


@pytest_twisted.ensureDeferred
async def test_tiny_filesystem(managers, state_dir):
    """A filesystem without the required free space refuses creates, leaving nothing."""
    st = os.statvfs(state_dir)
    manager = managers(min_free_mb=st.f_bavail * st.f_frsize // 1024**2 + 1)
    err = await fails_with(manager.create("vm", 1, 64, 1), InvalidVmState)
    assert "free space" in err.message
    assert entries(state_dir) == []


# -- with qemu-img: definitions and limits ---------------------------------------------


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_create_defines_vm(managers, state_dir):
    """create writes a definition and a sparse qcow2 disk; the VM is stopped."""
    manager = managers()
    vm = await create(manager, "web", disk_gb=1)
    assert vm.state == "stopped" and vm.name == "web" and vm.image is None
    assert len(vm.vm_id) == 32
    directory = os.path.join(state_dir, "vms", vm.vm_id)
    assert sorted(os.listdir(directory)) == ["disk.qcow2", "vm.json"]
    with open(os.path.join(directory, "vm.json")) as f:
        assert json.load(f) == vm.to_wire()
    info = json.loads(
        subprocess.check_output(
            [
                "qemu-img",
                "info",
                "-U",
                "--output=json",
                os.path.join(directory, "disk.qcow2"),
            ]
        )
    )
    assert info["format"] == "qcow2" and info["virtual-size"] == 1024**3
    assert await manager.get(vm.vm_id) == vm
    # A defined VM reserves all it may use, stopped or not (CONTRACT §9).
    assert manager.usage() == {"vcpus": 1, "memory_mb": 64, "disk_gb": 1}


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_duplicate_name(managers, state_dir):
    """A second VM with a taken name is refused, even while the first is being created."""
    manager = managers()
    first = manager.create("same", 1, 64, 1)
    await fails_with(manager.create("same", 1, 64, 1), InvalidVmState)
    await within(first)
    await fails_with(manager.create("same", 1, 64, 1), InvalidVmState)
    assert len(entries(state_dir)) == 1


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_capacity_cap_counts_every_defined_vm(managers, state_dir):
    """NODE_CAPACITY replaces the host's in capacity() and caps the sum of every defined
    VM's vCPUs, memory and disk, concurrent creates included (CONTRACT §9)."""
    cap = {"vcpus": 3, "memory_mb": 256, "disk_gb": 10}
    manager = managers(capacity_cap=cap)
    assert manager.capacity() == cap
    a = manager.create("a", 2, 64, 1)
    err = await fails_with(manager.create("b", 2, 64, 1), InvalidVmState)
    assert "not enough vcpus" in err.message
    await within(a)
    await within(manager.create("b", 1, 192, 1))
    assert manager.usage() == {"vcpus": 3, "memory_mb": 256, "disk_gb": 2}
    assert len(entries(state_dir)) == 2


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_limits(managers, state_dir):
    """Memory and disk limits count every defined VM, including concurrent creates."""
    manager = managers(memory_limit_mb=128, disk_limit_gb=3, capacity_cap={"vcpus": 64})
    a = manager.create("a", 1, 64, 2)
    b = manager.create("b", 1, 64, 1)
    err = await fails_with(manager.create("c", 1, 64, 1), InvalidVmState)
    assert "memory" in err.message
    await within(defer.gatherResults([a, b]))
    manager2 = managers(memory_limit_mb=1024, disk_limit_gb=3, capacity_cap={"vcpus": 64})
    err = await fails_with(manager2.create("c", 1, 64, 1), InvalidVmState)
    assert "not enough disk" in err.message
    assert len(entries(state_dir)) == 2


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_image_is_backing_file(managers, state_dir):
    """A base image becomes the disk's backing file, with its detected format."""
    os.mkdir(os.path.join(state_dir, "images"))
    base = os.path.join(state_dir, "images", "base.raw")
    subprocess.check_call(["qemu-img", "create", "-q", "-f", "raw", base, "16M"])
    manager = managers()
    vm = await create(manager, image=base)
    assert vm.image == base
    info = json.loads(
        subprocess.check_output(
            [
                "qemu-img",
                "info",
                "-U",
                "--output=json",
                os.path.join(state_dir, "vms", vm.vm_id, "disk.qcow2"),
            ]
        )
    )
    assert info["backing-filename"] == base
    assert info["backing-filename-format"] == "raw"


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_image_not_an_image(managers, state_dir):
    """An image qemu-img cannot read is InvalidParams and leaves no VM directory."""
    os.mkdir(os.path.join(state_dir, "images"))
    bogus = os.path.join(state_dir, "images", "broken.qcow2")
    with open(bogus, "wb") as f:
        # qcow2's magic with a version that does not exist: probed as qcow2, unreadable.
        f.write(b"QFI\xfb\0\0\0\x09" + b"\0" * 200)
    manager = managers()
    await fails_with(manager.create("vm", 1, 64, 1, image=bogus), InvalidParams)
    assert entries(state_dir) == []


# -- with QEMU: lifecycle ---------------------------------------------------------------


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_lifecycle(managers, state_dir, logged_errors):
    """
    create, start (a real QEMU runs), stop (grace, then quit), start again and delete
    (QEMU gone, disk and definition gone).

    :param logged_errors: the conftest's collector of logged errors
    """
    manager = managers(stop_grace=0.5)
    vm = await create(manager)
    running = await within(manager.start(vm.vm_id))
    assert running.state == "running"
    pid = pid_of(state_dir, vm.vm_id)
    assert is_qemu(pid)
    assert manager.usage() == {"vcpus": 1, "memory_mb": 64, "disk_gb": 1}
    await fails_with(manager.start(vm.vm_id), InvalidVmState)

    started = time.monotonic()
    stopped = await within(manager.stop(vm.vm_id))
    # Nothing in the guest honours ACPI, so the grace period was waited out.
    assert time.monotonic() - started >= 0.5
    assert stopped.state == "stopped"
    assert await wait_gone(pid)
    assert not os.path.exists(os.path.join(state_dir, "vms", vm.vm_id, "qemu.pid"))
    await fails_with(manager.stop(vm.vm_id), InvalidVmState)

    again = await within(manager.start(vm.vm_id))
    assert again.state == "running"
    pid2 = pid_of(state_dir, vm.vm_id)
    assert pid2 != pid and is_qemu(pid2)

    assert await within(manager.delete(vm.vm_id)) is True
    assert await wait_gone(pid2)
    assert entries(state_dir) == []
    await fails_with(manager.get(vm.vm_id), VmNotFound)
    assert logged_errors.events == []


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_force_stop_is_immediate(managers, state_dir):
    """stop(force=True) quits QEMU at once instead of waiting out the grace period."""
    manager = managers(stop_grace=30.0)
    vm = await create(manager)
    await within(manager.start(vm.vm_id))
    pid = pid_of(state_dir, vm.vm_id)
    started = time.monotonic()
    assert (await within(manager.stop(vm.vm_id, force=True), 10)).state == "stopped"
    assert time.monotonic() - started < 10
    assert await wait_gone(pid)


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_force_overtakes_graceful_stop(managers, state_dir):
    """A forced stop during a graceful one ends both without waiting out the grace."""
    manager = managers(stop_grace=30.0)
    vm = await create(manager)
    await within(manager.start(vm.vm_id))
    graceful = manager.stop(vm.vm_id)
    await wait_state(manager, vm.vm_id, "stopping")
    started = time.monotonic()
    forced = await within(manager.stop(vm.vm_id, force=True), 10)
    assert forced.state == "stopped"
    assert (await within(graceful, 1)).state == "stopped"
    assert time.monotonic() - started < 10


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_delete_running(managers, state_dir):
    """Deleting a running VM stops its QEMU first."""
    manager = managers()
    vm = await create(manager)
    await within(manager.start(vm.vm_id))
    pid = pid_of(state_dir, vm.vm_id)
    assert await within(manager.delete(vm.vm_id)) is True
    assert await wait_gone(pid)
    assert entries(state_dir) == []
    assert manager.usage() == {"vcpus": 0, "memory_mb": 0, "disk_gb": 0}


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_kill_marks_error(managers, state_dir, logged_errors):
    """
    kill -9 of one QEMU moves that VM to error while another keeps running; the errored
    VM can be started again.

    :param logged_errors: the conftest's collector of logged errors
    """
    manager = managers()
    victim = await create(manager, "victim")
    other = await create(manager, "other")
    await within(
        defer.gatherResults([manager.start(victim.vm_id), manager.start(other.vm_id)])
    )
    victim_pid, other_pid = pid_of(state_dir, victim.vm_id), pid_of(state_dir, other.vm_id)
    os.kill(victim_pid, signal.SIGKILL)
    await wait_state(manager, victim.vm_id, "error")
    assert (await manager.get(other.vm_id)).state == "running"
    assert is_qemu(other_pid)
    with open(os.path.join(state_dir, "vms", victim.vm_id, "vm.json")) as f:
        assert json.load(f)["state"] == "error"
    assert any("lost QMP" in e["log_format"] for e in logged_errors.flush())

    assert (await within(manager.start(victim.vm_id))).state == "running"
    assert is_qemu(pid_of(state_dir, victim.vm_id))


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_qemu_start_failure(managers, state_dir, logged_errors):
    """A QEMU that cannot start leaves the VM stopped, with QEMU's reason, nothing
    running."""
    manager = managers()
    vm = await create(manager)
    os.unlink(os.path.join(state_dir, "vms", vm.vm_id, "disk.qcow2"))
    err = await fails_with(manager.start(vm.vm_id), InvalidVmState)
    assert "disk.qcow2" in err.message
    assert (await manager.get(vm.vm_id)).state == "stopped"
    assert not os.path.exists(os.path.join(state_dir, "vms", vm.vm_id, "qemu.pid"))
    assert logged_errors.flush()


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_announced_shutdown_is_stopped(managers, state_dir):
    """A QEMU that announces SHUTDOWN before exiting (as on guest power-off) ends
    stopped."""
    manager = managers()
    vm = await create(manager)
    await within(manager.start(vm.vm_id))
    pid = pid_of(state_dir, vm.vm_id)
    # Only one QMP client at a time: go through the manager's own session, as the
    # guest's power-off would make QEMU emit SHUTDOWN on it and exit.
    await within(manager._vms[vm.vm_id].qmp.execute("quit")).addErrback(lambda _: None)
    await wait_state(manager, vm.vm_id, "stopped")
    assert await wait_gone(pid)
    assert (await manager.get(vm.vm_id)).state == "stopped"


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_delete_overtakes_graceful_stop(managers, state_dir):
    """Deleting a VM that is waiting out a graceful stop quits it at once."""
    manager = managers(stop_grace=30.0)
    vm = await create(manager)
    await within(manager.start(vm.vm_id))
    graceful = manager.stop(vm.vm_id)
    await wait_state(manager, vm.vm_id, "stopping")
    started = time.monotonic()
    assert await within(manager.delete(vm.vm_id), 10) is True
    assert (await within(graceful, 1)).state == "stopped"
    assert time.monotonic() - started < 10
    assert entries(state_dir) == []


# -- with QEMU: node restart ------------------------------------------------------------


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_restart_recovers(managers, state_dir):
    """
    A new manager on the same state directory finds a running VM again (same pid, still
    running, still controllable) and keeps every definition.
    """
    first = managers()
    up = await create(first, "up")
    down = await create(first, "down")
    await within(first.start(up.vm_id))
    pid = pid_of(state_dir, up.vm_id)
    await within(first.stopService())
    # stopService leaves QEMU running, like libvirt.
    assert is_qemu(pid)

    second = managers()
    await within(second.when_recovered())
    assert {vm.vm_id: vm.state for vm in await second.list()} == {
        up.vm_id: "running",
        down.vm_id: "stopped",
    }
    assert pid_of(state_dir, up.vm_id) == pid and is_qemu(pid)
    assert (await second.get(up.vm_id)).created_at == up.created_at
    await fails_with(second.create("up", 1, 64, 1), InvalidVmState)

    assert (await within(second.stop(up.vm_id, force=True))).state == "stopped"
    assert await wait_gone(pid)


async def _died_while_node_was_down(managers, state_dir):
    """Start a VM, stop its manager (QEMU goes on), then kill its QEMU: the VM."""
    first = managers()
    vm = await create(first)
    await within(first.start(vm.vm_id))
    pid = pid_of(state_dir, vm.vm_id)
    await within(first.stopService())
    os.kill(pid, signal.SIGKILL)
    assert await wait_gone(pid)
    return vm


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_restart_after_qemu_died(managers, state_dir):
    """A VM whose QEMU died while the node was down is found stopped after restart."""
    vm = await _died_while_node_was_down(managers, state_dir)

    second = managers()
    await within(second.when_recovered())
    assert (await second.get(vm.vm_id)).state == "stopped"
    assert (await within(second.start(vm.vm_id))).state == "running"


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_restart_ignores_reused_pid(managers, state_dir):
    """A pid file naming some other live process is not taken for our QEMU."""
    vm = await _died_while_node_was_down(managers, state_dir)
    with open(os.path.join(state_dir, "vms", vm.vm_id, "qemu.pid"), "w") as f:
        f.write(str(os.getpid()))

    second = managers()
    await within(second.when_recovered())
    assert (await second.get(vm.vm_id)).state == "stopped"


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_restart_cleans_unfinished_create(managers, state_dir):
    """A VM directory without a definition (a create cut short) is removed on start."""
    first = managers()
    vm = await create(first)
    half = os.path.join(state_dir, "vms", "f" * 32)
    os.makedirs(half)
    open(os.path.join(half, "disk.qcow2"), "wb").close()
    second = managers()
    await within(second.when_recovered())
    assert entries(state_dir) == [vm.vm_id]
    assert [r.vm_id for r in await second.list()] == [vm.vm_id]
