"""
The real VM manager: one C{qemu-system-x86_64} process per running VM, driven over QMP.

Layout of the state directory (all ours; nothing else writes there)::

    <state_dir>/vms/<vm_id>/vm.json     the definition (VmInfo plus nothing else)
    <state_dir>/vms/<vm_id>/disk.qcow2  the VM's disk
    <state_dir>/vms/<vm_id>/qemu.pid    pid of its QEMU, while it runs
    <state_dir>/vms/<vm_id>/qmp.sock    its QMP socket, while it runs

QEMU is started with C{-daemonize}, so it is not our child: like libvirt, stopping the
node leaves VMs running, and the next start of the node finds them again by pid file and
QMP socket.
"""

import json
import os
import re
import shutil
import signal
import time
import uuid

import attrs
from twisted.application import service
from twisted.internet import defer, error, task, utils
from twisted.logger import Logger
from zope.interface import implementer

from hero_compute.node.qmp import connect_qmp
from hero_compute.node.vms import IVmManager, VmRecord, usage_of
from hero_compute.rpc.addresses import MAX_UNIX_PATH
from hero_compute.rpc.errors import (InvalidParams, InvalidVmState, RefusedByPolicy,
                                     VmNotFound)

_ID = re.compile(r"\A[0-9a-f]{32}\Z")
#: QEMU's own floor for guest RAM is far lower, but below this no firmware boots.
MIN_MEMORY_MB = 16
#: The i440fx machine's limit without an IOMMU/x2APIC setup.
MAX_VCPUS = 255
#: qcow2 with 64 KiB clusters needs 8 bytes of L2 table per cluster: 1/8192 of the
#: virtual size when the disk is fully allocated.
_QCOW2_METADATA_RATIO = 8192


def _bad(message):
    """Bad input: the caller sent something no node could accept."""
    return InvalidParams(message)


@attrs.define(eq=False)
class _Vm:
    """
    What the manager knows about one VM besides its record.

    :ivar record: the current L{VmRecord}; replaced, never mutated
    :ivar qmp: the live L{QmpProtocol} while we watch its QEMU
    :ivar lock: serialises start/stop/delete/recovery of this VM
    :ivar expect_exit: we asked QEMU to go away, so losing QMP is not a failure
    :ivar guest_shutdown: QEMU reported C{SHUTDOWN}: QEMU exits next, on purpose
    """

    record: VmRecord
    directory: str
    qmp: object = None
    lock: defer.DeferredLock = attrs.field(factory=defer.DeferredLock)
    expect_exit: bool = False
    guest_shutdown: bool = False

    @property
    def vm_id(self):
        return self.record.vm_id

    def path(self, name):
        return os.path.join(self.directory, name)


@implementer(IVmManager)
@attrs.define(eq=False)
class QemuVmManager(service.Service):
    """
    Runs the VMs of one node as QEMU processes (KVM where C{/dev/kvm} is usable, TCG
    elsewhere: C{-machine accel=kvm:tcg}).

    As a service, C{startService} loads every definition from the state directory and
    recovers the VMs that were running: a VM whose QEMU still runs (checked through
    C{/proc/<pid>/cmdline}) is reconnected over QMP and stays C{running}; one whose QEMU
    is gone becomes C{stopped}.  C{stopService} only closes the QMP connections: the QEMU
    processes keep running, as under libvirt, so restarting or upgrading the node does not
    reboot its VMs.  Use L{kill_all} to really get rid of them (tests, decommissioning).

    Resources: memory and disk are reserved when a VM is I{defined}, so every defined VM
    can run at once: C{create} is refused (-32005) when the memory of all defined VMs
    would exceed C{memory_limit_mb}, or their disks C{disk_limit_gb}.  Disks are sparse
    qcow2 files, so they do not take their size at once; C{create} is also refused when
    the state directory's filesystem has less free space than C{min_free_mb} plus the
    metadata the new disk needs when fully written (1/8192 of its size): the VM could not
    even start to fill its disk, and the node would be the first to run out of space.

    :param reactor: provides C{IReactorProcess}, C{IReactorUNIX} and C{IReactorTime}
    :param state_dir: the node's state directory; VMs live in C{<state_dir>/vms}
    :param qemu: the QEMU system emulator to run
    :param qemu_img: the C{qemu-img} tool to make disks with
    :param stop_grace: seconds a guest gets to honour an ACPI power-down before C{stop}
        makes QEMU quit
    :param start_timeout: seconds for QEMU to start and report C{running}
    :param memory_limit_mb: memory for all defined VMs together; default the host's
    :param disk_limit_gb: disk for all defined VMs together; default the size of the
        state directory's filesystem
    :param min_free_mb: free space the state directory's filesystem must keep
    :param image_dirs: when given, base images must lie under one of these directories
        (an C{image} elsewhere is refused with -32010); without it any file the node can
        read may become a VM's backing disk
    :param accel: QEMU's accelerator list; C{"kvm:tcg"} takes KVM where C{/dev/kvm} is
        usable and falls back to (much slower) emulation elsewhere
    """

    log = Logger()

    _reactor: object
    _state_dir: str = attrs.field(converter=lambda p: os.path.abspath(os.fspath(p)))
    _qemu: str = "qemu-system-x86_64"
    _qemu_img: str = "qemu-img"
    _stop_grace: float = 30.0
    _start_timeout: float = 30.0
    _memory_limit_mb: int | None = None
    _disk_limit_gb: int | None = None
    _min_free_mb: int = 256
    _image_dirs: tuple | None = attrs.field(
        default=None, converter=lambda ds: None if ds is None else tuple(
            os.path.abspath(d) for d in ds))
    _accel: str = "kvm:tcg"
    _vms: dict = attrs.field(init=False, factory=dict)
    # Names and resources of creates still running qemu-img, so two concurrent creates
    # cannot both take the last gigabyte or the same name.
    _creating: dict = attrs.field(init=False, factory=dict)
    _recovery: object = attrs.field(init=False, default=None)
    _closing: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self):
        longest = os.path.join(self._vms_dir, "0" * 32, "qmp.sock")
        if len(os.fsencode(longest)) > MAX_UNIX_PATH:
            raise ValueError(
                f"state directory {self._state_dir!r} is too long: QMP sockets under it "
                f"would exceed the {MAX_UNIX_PATH}-byte Unix socket path limit; "
                f"use a shorter HERO_STATE_DIR / --state-dir")

    @property
    def _vms_dir(self):
        return os.path.join(self._state_dir, "vms")

    # -- service --------------------------------------------------------------------

    def startService(self):
        """
        Load every VM definition and start recovering VMs that were running; see
        L{when_recovered}.
        """
        service.Service.startService(self)
        self._closing = False
        os.makedirs(self._vms_dir, exist_ok=True)
        self._load()
        recoveries = [vm.lock.run(self._recover, vm) for vm in list(self._vms.values())
                      if vm.record.state in ("starting", "running", "stopping")]
        self._recovery = defer.DeferredList(recoveries, consumeErrors=True)
        self._recovery.addCallback(lambda _: None)

    def stopService(self):
        """
        Close every QMP connection and leave the QEMU processes running.

        :return: a Deferred that fires when the connections are closed
        """
        service.Service.stopService(self)
        self._closing = True
        closed = []
        for vm in self._vms.values():
            if vm.qmp is not None:
                d = vm.qmp.when_disconnected()
                d.addTimeout(5, self._reactor)
                closed.append(d)
                vm.qmp.disconnect()
        return defer.DeferredList(closed, consumeErrors=True).addCallback(lambda _: None)

    def when_recovered(self):
        """
        :return: a Deferred that fires once the VMs found running at C{startService}
            are reconnected or marked stopped
        """
        if self._recovery is None:
            return defer.succeed(None)
        d = defer.Deferred()

        def done(result):
            d.callback(None)
            return result
        self._recovery.addBoth(done)
        return d

    def kill_all(self):
        """
        Kill every QEMU process of this manager at once (SIGKILL), without waiting; for
        test cleanup and decommissioning.  Records are left as they are.
        """
        for vm in self._vms.values():
            vm.expect_exit = True
            pid = self._our_pid(vm)
            if pid is not None:
                _kill(pid)

    # -- IVmManager -----------------------------------------------------------------

    def create(self, name, vcpus, memory_mb, disk_gb, image=None):
        """
        Define a VM and make its disk.

        :param name: unique on this node
        :param vcpus: virtual CPUs, 1 to the host's count
        :param memory_mb: guest memory in MB
        :param disk_gb: disk size in GB
        :param image: an absolute path to a base image the disk starts from (a qcow2
            overlay on top of it), or C{None} for an empty disk
        :return: a Deferred firing with the L{VmRecord}, state C{stopped}
        """
        return defer.Deferred.fromCoroutine(
            self._create(name, vcpus, memory_mb, disk_gb, image))

    def start(self, vm_id):
        """
        Start a stopped or errored VM and wait until QEMU reports it running.

        :param vm_id: the VM
        :return: a Deferred firing with the L{VmRecord}, state C{running}
        """
        try:
            vm = self._get(vm_id)
            self._check(vm, ("stopped", "error"), "start")
            # Claim the transition now, so a second start in the same tick is refused.
            self._set_state(vm, "starting")
        except Exception:
            return defer.fail()
        return vm.lock.run(lambda: defer.Deferred.fromCoroutine(self._start(vm)))

    def stop(self, vm_id, force=False):
        """
        Stop a VM: ACPI power-down, then C{quit} after C{stop_grace} seconds if the
        guest has not shut down by itself; C{force} quits at once.

        :param vm_id: the VM
        :param force: skip the power-down
        :return: a Deferred firing with the L{VmRecord}, state C{stopped}
        """
        try:
            vm = self._get(vm_id)
            allowed = ("running", "starting", "stopping") if force else ("running", "starting")
            self._check(vm, allowed, "stop")
        except Exception:
            return defer.fail()
        if force and vm.record.state == "stopping":
            # A forced stop overtakes a graceful one that is waiting out its grace.
            return defer.Deferred.fromCoroutine(self._force_quit(vm))
        return vm.lock.run(lambda: defer.Deferred.fromCoroutine(self._stop(vm, force)))

    def delete(self, vm_id):
        """
        Delete a VM with its disk, stopping it first (forcefully) if it runs.

        :param vm_id: the VM
        :return: a Deferred firing with C{True}
        """
        try:
            vm = self._get(vm_id)
        except Exception:
            return defer.fail()
        if vm.record.state == "stopping" and vm.qmp is not None:
            # Do not wait out a graceful stop's grace for a VM about to be destroyed.
            vm.qmp.execute("quit").addErrback(lambda _: None)
        return vm.lock.run(lambda: defer.Deferred.fromCoroutine(self._delete(vm)))

    def get(self, vm_id):
        """
        :param vm_id: the VM
        :return: a Deferred firing with its L{VmRecord}
        """
        return defer.maybeDeferred(lambda: self._get(vm_id).record)

    def list(self):
        """
        :return: a Deferred firing with all L{VmRecord}s, oldest first
        """
        return defer.succeed(sorted((vm.record for vm in self._vms.values()),
                                    key=lambda r: (r.created_at, r.vm_id)))

    def capacity(self):
        """
        :return: the host's C{{vcpus, memory_mb, disk_gb}}: CPUs, C{MemTotal} and the size
            of the state directory's filesystem, in whole units
        """
        st = os.statvfs(_existing(self._state_dir))
        return {
            "vcpus": os.cpu_count() or 1,
            "memory_mb": _mem_total_kb() // 1024,
            "disk_gb": st.f_blocks * st.f_frsize // 1024 ** 3,
        }

    def usage(self):
        """
        :return: what this node's VMs are given, per L{usage_of}
        """
        return usage_of([vm.record for vm in self._vms.values()])

    # -- create ---------------------------------------------------------------------

    def _get(self, vm_id):
        vm = self._vms.get(vm_id) if isinstance(vm_id, str) else None
        if vm is None:
            raise VmNotFound(f"no VM {vm_id!r}")
        return vm

    @staticmethod
    def _check(vm, allowed, action):
        if vm.record.state not in allowed:
            raise InvalidVmState(
                f"cannot {action} VM {vm.vm_id}: it is {vm.record.state}")

    def _validate(self, name, vcpus, memory_mb, disk_gb, image):
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise _bad("name must be a non-empty string of at most 255 characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise _bad("name must not contain control characters")
        for key, value in (("vcpus", vcpus), ("memory_mb", memory_mb), ("disk_gb", disk_gb)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _bad(f"{key} must be a positive integer, not {value!r}")
        if memory_mb < MIN_MEMORY_MB:
            raise _bad(f"memory_mb must be at least {MIN_MEMORY_MB}, not {memory_mb}")
        host = self.capacity()
        if vcpus > min(host["vcpus"], MAX_VCPUS):
            raise InvalidVmState(
                f"vcpus={vcpus} exceeds this node's {min(host['vcpus'], MAX_VCPUS)} CPUs")
        if image is not None:
            if not isinstance(image, str) or not os.path.isabs(image):
                raise _bad(f"image must be an absolute path on the node, not {image!r}")
            image = os.path.normpath(image)
            if self._image_dirs is not None and not any(
                    os.path.commonpath([os.path.realpath(image), d]) == d
                    for d in self._image_dirs):
                raise RefusedByPolicy(
                    f"image {image!r} is outside the allowed image directories")
            # InvalidParams, not InvalidVmState: the request names a file this node does
            # not have; no VM state is involved and only different params can succeed.
            if not os.path.isfile(image):
                raise _bad(f"image {image!r} does not exist or is not a regular file")
        taken = {vm.record.name for vm in self._vms.values()}
        taken.update(r["name"] for r in self._creating.values())
        if name in taken:
            raise InvalidVmState(f"a VM named {name!r} already exists on this node")

        defined = [vm.record for vm in self._vms.values()] + list(self._creating.values())
        mem_used = sum(_field(r, "memory_mb") for r in defined)
        disk_used = sum(_field(r, "disk_gb") for r in defined)
        mem_limit = host["memory_mb"] if self._memory_limit_mb is None else self._memory_limit_mb
        disk_limit = host["disk_gb"] if self._disk_limit_gb is None else self._disk_limit_gb
        if mem_used + memory_mb > mem_limit:
            raise InvalidVmState(
                f"not enough memory: {memory_mb} MB asked, {max(mem_limit - mem_used, 0)} MB "
                f"of {mem_limit} MB left for VMs on this node")
        if disk_used + disk_gb > disk_limit:
            raise InvalidVmState(
                f"not enough disk: {disk_gb} GB asked, {max(disk_limit - disk_used, 0)} GB "
                f"of {disk_limit} GB left for VMs on this node")
        st = os.statvfs(_existing(self._state_dir))
        free_mb = st.f_bavail * st.f_frsize // 1024 ** 2
        needed_mb = self._min_free_mb + -(-disk_gb * 1024 // _QCOW2_METADATA_RATIO)
        if free_mb < needed_mb:
            raise InvalidVmState(
                f"not enough free space in {self._state_dir}: {free_mb} MB free, "
                f"{needed_mb} MB needed for a {disk_gb} GB disk")
        return image

    async def _create(self, name, vcpus, memory_mb, disk_gb, image):
        image = self._validate(name, vcpus, memory_mb, disk_gb, image)
        vm_id = uuid.uuid4().hex
        self._creating[vm_id] = {"name": name, "memory_mb": memory_mb, "disk_gb": disk_gb}
        directory = os.path.join(self._vms_dir, vm_id)
        try:
            os.makedirs(directory)
            disk = os.path.join(directory, "disk.qcow2")
            args = ["create", "-q", "-f", "qcow2"]
            if image is not None:
                args += ["-b", image, "-F", await self._image_format(image)]
            args += [disk, f"{disk_gb}G"]
            out, err, code = await utils.getProcessOutputAndValue(
                self._qemu_img, args, env=os.environ, path=directory, reactor=self._reactor)
            if code != 0:
                raise InvalidVmState(
                    f"could not create the disk: {_last_line(err or out)}")
            record = VmRecord(vm_id, name, vcpus, memory_mb, disk_gb, image, "stopped",
                              self._reactor.seconds())
            vm = _Vm(record, directory)
            self._save(vm)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            del self._creating[vm_id]
        self._vms[vm_id] = vm
        self.log.info("created VM {vm_id} ({name}): {vcpus} vCPU, {memory_mb} MB, "
                      "{disk_gb} GB", vm_id=vm_id, name=name, vcpus=vcpus,
                      memory_mb=memory_mb, disk_gb=disk_gb)
        return record

    async def _image_format(self, image):
        # -U: the base image may be open in running VMs already; info only reads.
        out, err, code = await utils.getProcessOutputAndValue(
            self._qemu_img, ["info", "-U", "--output=json", image], env=os.environ,
            reactor=self._reactor)
        try:
            if code != 0:
                raise ValueError(_last_line(err or out))
            fmt = json.loads(out)["format"]
        except (ValueError, KeyError, TypeError) as e:
            raise _bad(f"image {image!r} is not a disk image qemu-img can read: {e}") from None
        if not isinstance(fmt, str) or not re.fullmatch(r"[a-z0-9_-]+", fmt):
            raise _bad(f"image {image!r} has an unusable format {fmt!r}")
        return fmt

    # -- start ----------------------------------------------------------------------

    def _qemu_args(self, vm):
        record = vm.record
        return [
            "-name", "guest=" + _opt(record.name),
            "-machine", f"accel={_opt(self._accel)}",
            "-m", str(record.memory_mb),
            "-smp", str(record.vcpus),
            "-drive", f"file={_opt(vm.path('disk.qcow2'))},format=qcow2,if=virtio",
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-daemonize",
            "-pidfile", vm.path("qemu.pid"),
            "-qmp", f"unix:{_opt(vm.path('qmp.sock'))},server=on,wait=off",
        ]

    async def _start(self, vm):
        if vm.record.state != "starting":
            # Deleted or stopped while we waited for the lock.
            raise InvalidVmState(f"cannot start VM {vm.vm_id}: it is {vm.record.state}")
        try:
            stale = self._our_pid(vm)
            if stale is not None:
                # The VM errored while its QEMU lived on without QMP: that process is
                # out of our control and holds the disk's lock.
                self.log.warn("killing stale QEMU {pid} of VM {vm_id}", pid=stale,
                              vm_id=vm.vm_id)
                _kill(stale)
                await self._wait_gone(stale, 5)
            self._remove_runtime(vm)
            vm.expect_exit = vm.guest_shutdown = False
            spawn = utils.getProcessOutputAndValue(
                self._qemu, self._qemu_args(vm), env=os.environ, path=vm.directory,
                reactor=self._reactor)
            spawn.addTimeout(self._start_timeout, self._reactor)
            out, err, code = await spawn
            if code != 0:
                raise InvalidVmState(
                    f"QEMU could not start VM {vm.vm_id}: {_last_line(err or out)}")
            await self._attach(vm, self._start_timeout)
        except BaseException as e:
            self.log.error("VM {vm_id} failed to start: {error}", vm_id=vm.vm_id, error=e)
            await self._abandon(vm)
            self._set_state(vm, "error")
            if isinstance(e, (InvalidVmState, defer.CancelledError)):
                raise
            if isinstance(e, (defer.TimeoutError, error.TimeoutError)):
                raise InvalidVmState(f"VM {vm.vm_id} did not start within "
                                     f"{self._start_timeout} s") from None
            # -32005 with QEMU's words rather than an opaque -32603: the operator needs
            # them, and they hold nothing secret.
            raise InvalidVmState(f"VM {vm.vm_id} failed to start: {e}") from None
        self._set_state(vm, "running")
        self.log.info("VM {vm_id} running as QEMU pid {pid}", vm_id=vm.vm_id,
                      pid=self._our_pid(vm))
        return vm.record

    async def _attach(self, vm, timeout):
        """
        Connect to a VM's QMP socket, wait until QEMU reports it running and watch it.
        """
        deadline = self._reactor.seconds() + timeout
        qmp = await connect_qmp(self._reactor, vm.path("qmp.sock"),
                                on_event=lambda *a: self._event(vm, *a), timeout=timeout)
        vm.qmp = qmp
        qmp.when_disconnected().addCallback(self._qmp_lost, vm, qmp)
        while True:
            d = qmp.execute("query-status")
            d.addTimeout(max(deadline - self._reactor.seconds(), 0.1), self._reactor)
            status = await d
            if status.get("running"):
                if self._closing:
                    # stopService ran meanwhile; it leaves QEMU alone, and so do we.
                    qmp.disconnect()
                return
            if self._reactor.seconds() > deadline:
                raise InvalidVmState(
                    f"VM {vm.vm_id} is {status.get('status')!r}, not running")
            await task.deferLater(self._reactor, 0.1, lambda: None)

    async def _abandon(self, vm):
        """Make sure nothing of a failed start keeps running."""
        vm.expect_exit = True
        if vm.qmp is not None:
            vm.qmp.disconnect()
            vm.qmp = None
        pid = self._our_pid(vm)
        if pid is not None:
            _kill(pid)
            await self._wait_gone(pid, 5)
        self._remove_runtime(vm)

    # -- watching -------------------------------------------------------------------

    def _event(self, vm, name, data, timestamp):
        if name == "SHUTDOWN":
            vm.guest_shutdown = True
            self.log.info("VM {vm_id}: QEMU shutting down ({reason})", vm_id=vm.vm_id,
                          reason=data.get("reason", "unknown"))
        elif name in ("STOP", "RESUME", "RESET", "POWERDOWN", "GUEST_PANICKED"):
            self.log.info("VM {vm_id}: QMP event {event} {data}", vm_id=vm.vm_id,
                          event=name, data=data)

    def _qmp_lost(self, reason, vm, qmp):
        if vm.qmp is qmp:
            vm.qmp = None
        if self._closing or vm.expect_exit or vm.record.state not in ("running",):
            return
        if vm.guest_shutdown:
            # The guest powered off by itself: QEMU exits after SHUTDOWN, as asked.
            self.log.info("VM {vm_id} shut down by its guest", vm_id=vm.vm_id)
            self._remove_runtime(vm)
            self._set_state(vm, "stopped")
            return
        self.log.error("VM {vm_id}: lost QMP connection to its QEMU unexpectedly "
                       "({why}); marking it error", vm_id=vm.vm_id,
                       why=reason)
        self._set_state(vm, "error")

    # -- stop and delete ------------------------------------------------------------

    async def _stop(self, vm, force):
        if vm.record.state not in ("running", "starting"):
            raise InvalidVmState(f"cannot stop VM {vm.vm_id}: it is {vm.record.state}")
        self._set_state(vm, "stopping")
        await self._shut_down(vm, force)
        self._set_state(vm, "stopped")
        self.log.info("VM {vm_id} stopped", vm_id=vm.vm_id)
        return vm.record

    async def _force_quit(self, vm):
        # The graceful stop holding the lock sees the connection go and finishes.
        qmp = vm.qmp
        if qmp is not None:
            try:
                await qmp.execute("quit").addTimeout(5, self._reactor)
            except Exception:
                pass
        return await vm.lock.run(lambda: defer.succeed(vm.record))

    async def _shut_down(self, vm, force):
        vm.expect_exit = True
        pid = self._our_pid(vm)
        qmp = vm.qmp
        if qmp is not None:
            gone = qmp.when_disconnected()
            if not force:
                await self._quietly(qmp.execute("system_powerdown"), 5)
                await self._quietly(qmp.when_disconnected(), self._stop_grace)
            if not gone.called:
                await self._quietly(qmp.execute("quit"), 5)
                await self._quietly(qmp.when_disconnected(), 10)
            qmp.disconnect()
        elif pid is not None:
            # No QMP (an errored VM whose QEMU lives on): nothing to ask politely.
            _kill(pid)
        if pid is not None and not await self._wait_gone(pid, 10):
            self.log.warn("VM {vm_id}: QEMU {pid} ignored quit; killing it",
                          vm_id=vm.vm_id, pid=pid)
            _kill(pid)
            await self._wait_gone(pid, 5)
        self._remove_runtime(vm)

    async def _quietly(self, d, timeout):
        """Wait for C{d} at most C{timeout} seconds; a failure or timeout is no error."""
        d.addTimeout(timeout, self._reactor)
        try:
            return await d
        except Exception:
            return None

    async def _delete(self, vm):
        if self._vms.get(vm.vm_id) is not vm:
            raise VmNotFound(f"no VM {vm.vm_id!r}")
        if vm.record.state != "stopped":
            self._set_state(vm, "stopping")
            await self._shut_down(vm, force=True)
        del self._vms[vm.vm_id]
        # Remove the definition first: a crash half-way through leaves a directory
        # without vm.json, which startService cleans up, never a VM without its disk.
        try:
            os.unlink(vm.path("vm.json"))
        except FileNotFoundError:
            pass
        shutil.rmtree(vm.directory, ignore_errors=True)
        self.log.info("deleted VM {vm_id} ({name})", vm_id=vm.vm_id, name=vm.record.name)
        return True

    # -- persistence and recovery ---------------------------------------------------

    def _set_state(self, vm, state):
        if vm.record.state == state:
            return
        vm.record = attrs.evolve(vm.record, state=state)
        if self._vms.get(vm.vm_id) is vm:
            self._save(vm)

    def _save(self, vm):
        """Write a VM's definition atomically: a crash leaves the old or the new one."""
        path = vm.path("vm.json")
        tmp = path + ".tmp"
        data = json.dumps(vm.record.to_wire(), indent=2, sort_keys=True).encode("utf-8")
        # A few hundred bytes: the synchronous write and fsync cost less than a thread
        # hand-off would, and keep writes for one VM in order.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(vm.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _load(self):
        for entry in sorted(os.listdir(self._vms_dir)):
            directory = os.path.join(self._vms_dir, entry)
            if not _ID.match(entry) or not os.path.isdir(directory):
                continue
            if entry in self._vms:
                continue
            path = os.path.join(directory, "vm.json")
            if not os.path.exists(path):
                # A create or delete interrupted by a crash: the definition is written
                # last and removed first, so nothing here was ever a VM.
                self.log.warn("removing unfinished VM directory {path}", path=directory)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            try:
                with open(path, "rb") as f:
                    data = json.load(f)
                fields = {a.name for a in attrs.fields(VmRecord)}
                record = VmRecord(**{k: data[k] for k in fields})
                if record.vm_id != entry:
                    raise ValueError(f"vm_id {record.vm_id!r} does not match its directory")
            except Exception:
                # Keep it on disk for the operator; never delete what we cannot read.
                self.log.failure("cannot load VM definition {path}; ignoring it", path=path)
                continue
            self._vms[entry] = _Vm(record, directory)
        self.log.info("loaded {count} VM definitions from {path}", count=len(self._vms),
                      path=self._vms_dir)

    async def _recover(self, vm):
        pid = self._our_pid(vm)
        if pid is None:
            self.log.info("VM {vm_id} was {state} but its QEMU is gone; marking it stopped",
                          vm_id=vm.vm_id, state=vm.record.state)
            self._remove_runtime(vm)
            self._set_state(vm, "stopped")
            return
        vm.expect_exit = vm.guest_shutdown = False
        try:
            # Ours, alive: whatever state we crashed in, it runs now.
            vm.record = attrs.evolve(vm.record, state="running")
            await self._attach(vm, 10)
        except Exception as e:
            self.log.error("VM {vm_id}: QEMU {pid} runs but QMP does not answer ({error}); "
                           "marking it error", vm_id=vm.vm_id, pid=pid, error=e)
            if vm.qmp is not None:
                vm.expect_exit = True
                vm.qmp.disconnect()
            self._set_state(vm, "error")
            return
        self._save(vm)
        self.log.info("VM {vm_id} recovered: QEMU {pid} still running", vm_id=vm.vm_id,
                      pid=pid)

    # -- processes ------------------------------------------------------------------

    def _our_pid(self, vm):
        """
        :return: the pid in the VM's pid file if that process is alive and really is
            this VM's QEMU (pids get reused), else C{None}
        """
        try:
            with open(vm.path("qemu.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            return None
        # A zombie has an empty command line, and the socket path is unique to this VM.
        qmp_arg = os.fsencode(f"unix:{_opt(vm.path('qmp.sock'))},server=on,wait=off")
        if b"-qmp" not in argv or qmp_arg not in argv:
            return None
        if not os.path.basename(argv[0]).startswith(b"qemu"):
            return None
        return pid

    async def _wait_gone(self, pid, timeout):
        """:return: whether process C{pid} ended (or became a zombie) in time"""
        deadline = time.monotonic() + timeout
        while process_alive(pid):
            if time.monotonic() > deadline:
                return False
            await task.deferLater(self._reactor, 0.05, lambda: None)
        return True

    @staticmethod
    def _remove_runtime(vm):
        for name in ("qemu.pid", "qmp.sock"):
            try:
                os.unlink(vm.path(name))
            except FileNotFoundError:
                pass


def _existing(path):
    """:return: C{path} or its nearest existing parent, for filesystem statistics"""
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _field(record, key):
    return record[key] if isinstance(record, dict) else getattr(record, key)


def _opt(value):
    """Escape a value for QEMU's comma-separated option syntax."""
    return value.replace(",", ",,")


def _last_line(output):
    lines = [line for line in output.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def process_alive(pid):
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
        if stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X"):
            return True
    return False


def _mem_total_kb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    raise RuntimeError("no MemTotal in /proc/meminfo")


__all__ = ["QemuVmManager"]
