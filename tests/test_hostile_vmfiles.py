"""
Hostile requests against a node's VM files (issue 10), each against the real
:class:`~hero_compute.node.qemu.QemuVmManager` or a real ``twistd -n node``: host files
as base images, probing which paths exist, symlinks swapped in after ``vm.create``,
world-readable disks, and a ``vm.start`` that fails part-way.
"""

import json
import os
import stat
import subprocess
import uuid

import pytest
import pytest_twisted

from hero_compute.rpc.errors import InvalidParams, InvalidVmState, RefusedByPolicy

from . import test_qemu
from .support import rpc, wait_for
from .test_qemu import create, entries, fails_with, is_qemu, needs_qemu, pid_of, within

pytestmark = pytest.mark.qemu

#: test_qemu's fixtures: a state directory whose QEMUs are killed at the end, and
#: managers on it.
state_dir = test_qemu.state_dir
managers = test_qemu.managers

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def raw_image(path, size="16M"):
    """
    Make a raw disk image.

    :param path: where
    :param size: its size, as qemu-img takes it
    :return: ``path``
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subprocess.check_call(["qemu-img", "create", "-q", "-f", "raw", path, size])
    return path


def backing_file(state_dir, vm_id):
    """:return: the backing file recorded in a VM's disk"""
    info = json.loads(
        subprocess.check_output(
            [
                "qemu-img",
                "info",
                "-U",
                "--output=json",
                os.path.join(state_dir, "vms", vm_id, "disk.qcow2"),
            ]
        )
    )
    return info.get("backing-filename")


def open_files(pid):
    """:return: the paths process ``pid`` has open"""
    fds = f"/proc/{pid}/fd"
    paths = set()
    for fd in os.listdir(fds):
        try:
            paths.add(os.readlink(os.path.join(fds, fd)))
        except OSError:
            pass
    return paths


def on_disk_state(state_dir, vm_id):
    """:return: the state in a VM's saved definition"""
    with open(os.path.join(state_dir, "vms", vm_id, "vm.json")) as f:
        return json.load(f)["state"]


def mode(path):
    """:return: the permission bits of ``path``"""
    return stat.S_IMODE(os.stat(path).st_mode)


def same_shape(errors, paths):
    """:return: the messages of ``errors`` with their own path taken out"""
    pairs = zip(errors, paths, strict=True)
    return {e.message.replace(repr(p), "<image>") for e, p in pairs}


@pytest.fixture
def tmpfs_state_dir(state_dir):
    """``state_dir`` on its own 8 MB tmpfs, unmounted at the end."""
    subprocess.check_call(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", state_dir]
    )
    yield state_dir
    # Lazily: a QEMU killed by the managers fixture may hold its disk a moment longer.
    subprocess.call(["umount", "-l", state_dir])


def fill(directory):
    """
    Fill the filesystem of ``directory`` to the last byte.

    :return: the filler file, to remove
    """
    path = os.path.join(directory, "filler")
    with open(path, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass
    return path


# -- base images ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_host_files_refused_by_default(managers, state_dir):
    """With no image dirs configured, /etc/shadow and other host files are -32010."""
    manager = managers()
    for image in (
        "/etc/shadow",
        "/etc/passwd",
        "/dev/sda",
        os.path.join(state_dir, "vms", "x", "disk.qcow2"),
        os.path.join(state_dir, "images", "..", "node_id"),
    ):
        err = await fails_with(manager.create("vm", 1, 64, 1, image=image), RefusedByPolicy)
        assert err.code == -32010
    assert entries(state_dir) == []
    assert await manager.list() == []


@pytest_twisted.ensureDeferred
async def test_refusal_does_not_tell_existence(managers, state_dir):
    """Outside the image dirs, existing and missing paths get one and the same refusal."""
    images = os.path.join(state_dir, "images")
    os.makedirs(images)
    manager = managers()
    missing = f"/etc/no-such-{uuid.uuid4().hex}"
    # Up from a symlink (into /etc/ssl/certs) and from a plain directory, back into the
    # image dir: lexically the same path, but realpath would follow the symlink before
    # the "..".  Looking only after normalising answers both alike.
    os.symlink("/etc/ssl/certs", os.path.join(state_dir, "link"))
    os.mkdir(os.path.join(state_dir, "x"))
    pairs = [
        ("/etc/shadow", missing, RefusedByPolicy),
        ("/etc/shadow/x", missing + "/x", RefusedByPolicy),
        (f"{state_dir}/link/../images/a", f"{state_dir}/x/../images/a", InvalidParams),
    ]
    for existing, absent, error in pairs:
        errors = [
            await fails_with(manager.create("vm", 1, 64, 1, image=p), error)
            for p in (existing, absent)
        ]
        assert len(same_shape(errors, (existing, absent))) == 1
    # A symlink inside the image dir, pointing out: existing target or not, one answer.
    link = os.path.join(images, "link.raw")
    messages = set()
    for target in ("/etc/shadow", missing):
        os.symlink(target, link)
        err = await fails_with(manager.create("vm", 1, 64, 1, image=link), RefusedByPolicy)
        messages.add(err.message)
        assert target not in err.message
        os.unlink(link)
    assert len(messages) == 1
    assert entries(state_dir) == []


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_missing_inside_image_dir(managers, state_dir):
    """Inside the image dirs, a missing image or a directory is InvalidParams."""
    manager = managers()
    images = os.path.join(state_dir, "images")
    os.makedirs(os.path.join(images, "sub"))
    for image in (os.path.join(images, "gone.raw"), os.path.join(images, "sub")):
        await fails_with(manager.create("vm", 1, 64, 1, image=image), InvalidParams)
    assert entries(state_dir) == []


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_resolved_image_is_stored_and_opened(managers, state_dir, tmp_path):
    """The resolved image is stored and backs the disk; a later symlink swap is ignored."""
    images = os.path.join(state_dir, "images")
    base = raw_image(os.path.join(images, "v1", "base.raw"))
    link = os.path.join(images, "current.raw")
    os.symlink(os.path.join("v1", "base.raw"), link)
    manager = managers()
    vm = await create(manager, image=link)
    assert vm.image == base
    assert backing_file(state_dir, vm.vm_id) == base
    secret = raw_image(str(tmp_path / "secret.raw"))
    os.unlink(link)
    os.symlink(secret, link)
    await within(manager.start(vm.vm_id))
    opened = open_files(pid_of(state_dir, vm.vm_id))
    assert base in opened and secret not in opened
    await within(manager.stop(vm.vm_id, force=True))


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_symlink_swapped_in_refuses_start(
    managers, state_dir, tmp_path, logged_errors
):
    """
    A symlink swapped into the stored image's path after create refuses the start
    (-32010) and leaves the VM stopped; undone, the VM starts.

    :param logged_errors: the conftest's collector of logged errors
    """
    images = os.path.join(state_dir, "images")
    base = raw_image(os.path.join(images, "v1", "base.raw"))
    manager = managers()
    vm = await create(manager, image=base)
    outside = tmp_path / "outside"
    raw_image(str(outside / "base.raw"))

    async def refused():
        err = await fails_with(manager.start(vm.vm_id), RefusedByPolicy)
        assert err.code == -32010
        assert (await manager.get(vm.vm_id)).state == "stopped"
        assert on_disk_state(state_dir, vm.vm_id) == "stopped"
        assert not os.path.exists(os.path.join(state_dir, "vms", vm.vm_id, "qemu.pid"))

    # A directory on the way swapped for a symlink out of the image dir.
    v1 = os.path.join(images, "v1")
    os.rename(v1, v1 + ".real")
    os.symlink(outside, v1)
    await refused()
    os.unlink(v1)
    os.rename(v1 + ".real", v1)
    # The file itself swapped for a symlink.
    os.rename(base, base + ".real")
    os.symlink(outside / "base.raw", base)
    await refused()
    os.unlink(base)
    os.rename(base + ".real", base)
    assert (await within(manager.start(vm.vm_id))).state == "running"
    assert logged_errors.flush()


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_image_dirs_narrowed_refuses_start(managers, state_dir, logged_errors):
    """A VM whose image is no longer under the configured image dirs does not start."""
    base = raw_image(os.path.join(state_dir, "images", "base.raw"))
    manager = managers()
    vm = await create(manager, image=base)
    await within(manager.stopService())
    narrowed = managers(image_dirs=[os.path.join(state_dir, "other")])
    await fails_with(narrowed.start(vm.vm_id), RefusedByPolicy)
    assert (await narrowed.get(vm.vm_id)).state == "stopped"
    assert logged_errors.flush()


# -- modes ------------------------------------------------------------------------------


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_private_modes_whatever_the_umask(managers, state_dir):
    """With umask 0, VM directories are 0700 and disks and definitions 0600."""
    manager = managers()
    old = os.umask(0)
    try:
        vm = await create(manager)
    finally:
        os.umask(old)
    directory = os.path.join(state_dir, "vms", vm.vm_id)
    assert mode(os.path.join(state_dir, "vms")) == 0o700
    assert mode(directory) == 0o700
    assert mode(os.path.join(directory, "disk.qcow2")) == 0o600
    assert mode(os.path.join(directory, "vm.json")) == 0o600


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_loose_modes_tightened_on_load(managers, state_dir):
    """VM directories and disks an older node left 0755/0644 are made private at start."""
    manager = managers()
    vm = await create(manager)
    await within(manager.stopService())
    directory = os.path.join(state_dir, "vms", vm.vm_id)
    for path, loose in (
        (os.path.join(state_dir, "vms"), 0o755),
        (directory, 0o755),
        (os.path.join(directory, "disk.qcow2"), 0o644),
    ):
        os.chmod(path, loose)
    managers()
    assert mode(os.path.join(state_dir, "vms")) == 0o700
    assert mode(directory) == 0o700
    assert mode(os.path.join(directory, "disk.qcow2")) == 0o600


# -- a start that fails part-way --------------------------------------------------------


@needs_root
@needs_qemu
@pytest_twisted.ensureDeferred
async def test_start_on_full_disk(tmpfs_state_dir, managers):
    """On a full state filesystem vm.start is -32005 and the VM stays stopped."""
    state_dir = tmpfs_state_dir
    manager = managers(min_free_mb=0, disk_limit_gb=10)
    vm = await create(manager)
    filler = fill(state_dir)
    err = await fails_with(manager.start(vm.vm_id), InvalidVmState)
    assert "No space left" in err.message
    assert (await manager.get(vm.vm_id)).state == "stopped"
    assert on_disk_state(state_dir, vm.vm_id) == "stopped"
    await fails_with(manager.start(vm.vm_id), InvalidVmState)
    os.unlink(filler)
    assert (await within(manager.start(vm.vm_id))).state == "running"
    assert (await within(manager.stop(vm.vm_id, force=True))).state == "stopped"


@needs_qemu
@pytest_twisted.ensureDeferred
async def test_qemu_missing_leaves_stopped(managers, state_dir, logged_errors):
    """
    A QEMU that cannot even be run fails vm.start with a clear error, the VM stays
    stopped, and it starts once QEMU is there.

    :param logged_errors: the conftest's collector of logged errors
    """
    broken = managers(qemu="/nonexistent/qemu-system-x86_64")
    vm = await create(broken)
    err = await fails_with(broken.start(vm.vm_id), InvalidVmState)
    assert "failed to start" in err.message or "could not start" in err.message
    assert (await broken.get(vm.vm_id)).state == "stopped"
    assert on_disk_state(state_dir, vm.vm_id) == "stopped"
    assert logged_errors.flush()
    await within(broken.stopService())
    fixed = managers()
    assert (await within(fixed.start(vm.vm_id))).state == "running"


# -- through a real node ----------------------------------------------------------------


def kill_qemus(state_dir):
    """SIGKILL every QEMU that left a pid file under ``state_dir``."""
    for vm_id in entries(state_dir):
        try:
            pid = pid_of(state_dir, vm_id)
        except (OSError, ValueError):
            continue
        if is_qemu(pid):
            os.kill(pid, 9)


@needs_qemu
def test_through_node(twistd, short_tmp):
    """
    Over a real node's Unix socket: host files are -32010 with one message whether or
    not they exist, an image under <state>/images works, and a start whose QEMU fails
    leaves the VM stopped while the node keeps serving.
    """
    state = f"{short_tmp}/st"
    uri = f"unix://{short_tmp}/n.sock"
    node = twistd(
        [
            "node",
            "--socket",
            f"{short_tmp}/n.sock",
            "--state-dir",
            state,
            "--interval",
            "60",
        ],
        env={"HOME": short_tmp},
    )
    node.listening()
    try:
        _through_node(uri, state)
    finally:
        kill_qemus(state)


def _through_node(uri, state):
    def call(method, **params):
        return rpc(uri, method, params, timeout=60)

    vm = {"name": "vm", "vcpus": 1, "memory_mb": 64, "disk_gb": 1}
    missing = f"/etc/no-such-{uuid.uuid4().hex}"
    answers = [call("vm.create", **vm, image=p)["error"] for p in ("/etc/shadow", missing)]
    assert {e["code"] for e in answers} == {-32010}
    assert answers[0]["message"].replace("/etc/shadow", "X") == answers[1][
        "message"
    ].replace(missing, "X")
    assert call("vm.list")["result"] == []

    base = raw_image(f"{state}/images/base.raw")
    made = call("vm.create", **vm, image=base)["result"]
    assert made["image"] == base
    disk = f"{state}/vms/{made['vm_id']}/disk.qcow2"
    os.rename(disk, disk + ".real")
    with open(disk, "wb") as f:
        f.write(b"not a qcow2 image" * 100)
    error = call("vm.start", vm_id=made["vm_id"])["error"]
    assert error["code"] == -32005 and "start" in error["message"]
    assert call("vm.get", vm_id=made["vm_id"])["result"]["state"] == "stopped"
    os.replace(disk + ".real", disk)
    assert call("vm.start", vm_id=made["vm_id"])["result"]["state"] == "running"
    wait_for(lambda: is_qemu(pid_of(state, made["vm_id"])), what="QEMU running")
    assert call("vm.delete", vm_id=made["vm_id"])["result"] is True
