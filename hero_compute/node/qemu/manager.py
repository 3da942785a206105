"""
The VM lifecycle: :class:`QemuVmManager` runs the VMs of one node as QEMU processes
driven over QMP, and owns their states.  One VM's QEMU is :class:`~.machine.Machine`'s
business; disk layout :mod:`.store`'s, QEMU's command line :mod:`.process`'s, admission
:mod:`.admission`'s, network, seed and boot :mod:`.access`'s, start-up :mod:`.recovery`'s.

Long because: the state machine of a VM (every transition, its lock and its persisted
record) reads best in one place; everything else, defining a VM (:mod:`.define`)
included, is already split out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from hero_compute.node.vms import IVmManager, VmRecord, usage_of
from hero_compute.rpc.addresses import MAX_UNIX_PATH
from hero_compute.rpc.errors import InvalidVmState, VmNotFound

from . import access, define, disks, process, recovery
from .accel import AccelChoice
from .admission import Admission, host_capacity
from .console import ConsoleSettings, SerialConsole
from .images import ImagePolicy, default_image_dirs
from .machine import Machine
from .network import NetworkPolicy
from .store import QMP_SOCKET, VmStore


@implementer(IVmManager)
@attrs.define(eq=False)
class QemuVmManager(service.Service):
    """
    Runs the VMs of one node as QEMU processes, under KVM or TCG (see :mod:`.accel`).

    As a service, ``startService`` loads every definition from the state directory and
    recovers the VMs that were running: a VM whose QEMU still runs (checked through
    ``/proc/<pid>/cmdline``) is reconnected over QMP and stays ``running``; one whose QEMU
    is gone becomes ``stopped``.  ``stopService`` only closes the QMP connections: the
    QEMU processes keep running, as under libvirt, so restarting or upgrading the node
    does not reboot its VMs.  Use :meth:`kill_all` to really get rid of them (tests,
    decommissioning).

    Resources are reserved when a VM is *defined*; see :class:`~.admission.Admission`.

    :param reactor: provides ``IReactorProcess``, ``IReactorUNIX`` and ``IReactorTime``
    :param state_dir: the node's state directory; VMs live in ``<state_dir>/vms``
    :param qemu: the QEMU system emulator to run
    :param qemu_img: the ``qemu-img`` tool to make disks with
    :param stop_grace: seconds a guest gets to honour an ACPI power-down before ``stop``
        makes QEMU quit
    :param start_timeout: seconds for QEMU to start and report ``running``
    :param memory_limit_mb: memory for all defined VMs together; default the host's
    :param disk_limit_gb: disk for all defined VMs together; default the size of the
        state directory's filesystem
    :param min_free_mb: free space the state directory's filesystem must keep
    :param image_dirs: base images must lie under one of these directories (an
        ``image`` elsewhere is refused with -32010); default ``<state_dir>/images``.
        See :mod:`.images`
    :param capacity_cap: ``NODE_CAPACITY``: any of ``vcpus``, ``memory_mb``,
        ``disk_gb``, replacing the host's in :meth:`capacity` (what VMs may reserve)
    :param accel: ``NODE_ACCEL``: ``auto`` (see :mod:`.accel`), ``kvm`` or ``tcg``
    :param network: the :class:`~.network.NetworkPolicy` (bridges, forward ports)
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
    _image_dirs: Sequence[str] | None = None
    _capacity_cap: dict = attrs.field(factory=dict)
    _accel_mode: str = attrs.field(default="auto", alias="accel")
    _accel: AccelChoice = attrs.field(init=False)
    _network: NetworkPolicy = attrs.field(factory=NetworkPolicy)
    _access: access.AccessPolicy = attrs.field(init=False)
    _console: ConsoleSettings = attrs.field(factory=ConsoleSettings)
    _admission: Admission = attrs.field(init=False)
    _store: VmStore = attrs.field(init=False)
    _vms: dict = attrs.field(init=False, factory=dict)
    # Reservations of creates still running qemu-img, so two concurrent creates cannot
    # both take the last gigabyte or the same name.
    _creating: dict = attrs.field(init=False, factory=dict)
    _definer: define.Definer = attrs.field(init=False)
    _recovery: defer.Deferred[None] | None = attrs.field(init=False, default=None)
    #: VMs whose QEMU started and reported running, and starts that failed: metrics.
    starts: int = attrs.field(init=False, default=0)
    start_failures: int = attrs.field(init=False, default=0)
    _closing: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self._store = VmStore(os.path.join(self._state_dir, "vms"))
        if self._image_dirs is None:
            self._image_dirs = default_image_dirs(self._state_dir)
        self._admission = Admission(
            self._state_dir,
            self._memory_limit_mb,
            self._disk_limit_gb,
            self._min_free_mb,
            images=ImagePolicy(self._image_dirs),
        )
        self._access = access.AccessPolicy(self._network, self._admission.images)
        self._accel = AccelChoice(self._accel_mode)
        self._definer = define.Definer(
            self._reactor,
            self._qemu_img,
            self._store,
            self._admission,
            self._access,
            self._vms,
            self._creating,
            self.capacity,
        )
        longest = os.path.join(self._store.directory("0" * 32), QMP_SOCKET)
        if len(os.fsencode(longest)) > MAX_UNIX_PATH:
            raise ValueError(
                f"state directory {self._state_dir!r} is too long: QMP sockets under it "
                f"would exceed the {MAX_UNIX_PATH}-byte Unix socket path limit; "
                f"use a shorter HERO_STATE_DIR / --state-dir"
            )

    # -- service --------------------------------------------------------------------

    def startService(self) -> None:
        """
        Load every VM definition and start recovering VMs that were running; see
        :meth:`when_recovered`.
        """
        service.Service.startService(self)
        self._closing = False
        for record in self._store.load(known=self._vms):
            self._vms[record.vm_id] = self._machine(record)
        self.log.info(
            "loaded {count} VM definitions from {path}",
            count=len(self._vms),
            path=self._store.root,
        )
        self._recovery = recovery.recover_all(
            self._reactor, self._vms.values(), self._set_state
        )
        self._accel.start(self._reactor, self._qemu)

    def stopService(self) -> defer.Deferred[None]:
        """
        Close every QMP connection and leave the QEMU processes running.

        :return: a Deferred that fires when the connections are closed
        """
        service.Service.stopService(self)
        self._closing = True
        closed = [vm.detach(5) for vm in self._vms.values()]
        return defer.DeferredList(closed, consumeErrors=True).addCallback(lambda _: None)

    def when_recovered(self) -> defer.Deferred[None]:
        """
        :return: a Deferred that fires once the VMs found running at ``startService``
            are reconnected or marked stopped, and leftover taps removed
        """
        return recovery.observe(self._recovery)

    def kill_all(self) -> None:
        """
        Kill every QEMU process of this manager at once (SIGKILL), without waiting; for
        test cleanup and decommissioning.  Records are left as they are.
        """
        for vm in self._vms.values():
            vm.expect_exit = True
            pid = vm.pid()
            if pid is not None:
                process.kill(pid)

    # -- IVmManager -----------------------------------------------------------------

    def create(
        self,
        name: str,
        vcpus: int,
        memory_mb: int,
        disk_gb: int,
        image: str | None = None,
        **params: Any,
    ) -> defer.Deferred[VmRecord]:
        """
        Define a VM and make its disk; ``params`` as :meth:`.access.AccessPolicy.plan`.

        :param name: unique on this node
        :param vcpus: virtual CPUs, 1 to the host's count
        :param memory_mb: guest memory in MB
        :param disk_gb: disk size in GB
        :param image: an absolute path to a base image the disk starts from (a qcow2
            overlay on top of it), or ``None`` for an empty disk
        :return: a Deferred firing with its record, state ``stopped``
        """
        return defer.Deferred.fromCoroutine(
            self._create(name, vcpus, memory_mb, disk_gb, image, params)
        )

    def start(self, vm_id: str) -> defer.Deferred[VmRecord]:
        """
        Start a stopped or errored VM and wait until QEMU reports it running.  A start
        that fails (its base image no longer allowed, QEMU failing, the state directory
        full) leaves the VM in the state it had.

        :param vm_id: the VM
        :return: a Deferred firing with its
            :class:`~hero_compute.node.vms.VmRecord`, state ``running``
        """
        try:
            vm = self._get(vm_id)
            self._check(vm, ("stopped", "error"), "start")
            was = vm.record.state
            # Claim the transition now, so a second start in the same tick is refused.
            self._set_state(vm, "starting", claim="start")
        except Exception:
            return defer.fail()
        return vm.lock.run(lambda: defer.Deferred.fromCoroutine(self._start(vm, was)))

    def stop(self, vm_id: str, force: bool = False) -> defer.Deferred[VmRecord]:
        """
        Stop a VM: ACPI power-down, then ``quit`` after ``stop_grace`` seconds if the
        guest has not shut down by itself; ``force`` quits at once.

        :param vm_id: the VM
        :param force: skip the power-down
        :return: a Deferred firing with its
            :class:`~hero_compute.node.vms.VmRecord`, state ``stopped``
        """
        try:
            vm = self._get(vm_id)
            allowed = (
                ("running", "starting", "stopping") if force else ("running", "starting")
            )
            self._check(vm, allowed, "stop")
        except Exception:
            return defer.fail()
        if force and vm.record.state == "stopping":
            # A forced stop overtakes a graceful one that is waiting out its grace.
            return defer.Deferred.fromCoroutine(self._force_quit(vm))
        return vm.lock.run(lambda: defer.Deferred.fromCoroutine(self._stop(vm, force)))

    def delete(self, vm_id: str) -> defer.Deferred[bool]:
        """
        Delete a VM with its disk, stopping it first (forcefully) if it runs.

        :param vm_id: the VM
        :return: a Deferred firing with ``True``
        """
        try:
            vm = self._get(vm_id)
        except Exception:
            return defer.fail()
        if vm.record.state == "stopping" and vm.qmp is not None:
            # Do not wait out a graceful stop's grace for a VM about to be destroyed.
            vm.qmp.execute("quit").addErrback(lambda _: None)
        return vm.lock.run(lambda: defer.Deferred.fromCoroutine(self._delete(vm)))

    def get(self, vm_id: str) -> defer.Deferred[VmRecord]:
        """:return: a Deferred firing with VM ``vm_id``'s record"""
        return defer.maybeDeferred(lambda: self._get(vm_id).record)

    def list(self) -> defer.Deferred[list[VmRecord]]:
        """:return: a Deferred firing with every VM's record, oldest first"""
        return defer.succeed(
            sorted(
                (vm.record for vm in self._vms.values()),
                key=lambda r: (r.created_at, r.vm_id),
            )
        )

    def capacity(self) -> dict[str, int]:
        """
        :return: what this node's VMs may reserve in all, ``{vcpus, memory_mb,
            disk_gb}``: the host's, per :func:`~.admission.host_capacity`, each replaced
            by ``NODE_CAPACITY``'s when it gives one
        """
        return {**host_capacity(self._state_dir), **self._capacity_cap}

    def usage(self) -> dict[str, int]:
        """
        :return: what this node's VMs are given, per
            :func:`~hero_compute.node.vms.usage_of`
        """
        return usage_of([vm.record for vm in self._vms.values()])

    def accel(self) -> str:
        """:return: ``kvm`` or ``tcg``, or ``probing`` until :mod:`.accel` decides"""
        return self._accel.current()

    # -- create ---------------------------------------------------------------------

    def _get(self, vm_id):
        vm = self._vms.get(vm_id) if isinstance(vm_id, str) else None
        if vm is None:
            raise VmNotFound(f"no VM {vm_id!r}")
        return vm

    @staticmethod
    def _check(vm, allowed, action):
        if vm.record.state not in allowed:
            raise InvalidVmState(f"cannot {action} VM {vm.vm_id}: it is {vm.record.state}")

    def console(self, vm_id: str) -> SerialConsole:
        """:return: the VM's :class:`~.console.SerialConsole`; VmNotFound if none"""
        return self._get(vm_id).console

    def _machine(self, record):
        directory = self._store.directory(record.vm_id)
        return Machine(
            record,
            directory,
            self._reactor,
            on_lost=self._qmp_lost,
            closing=lambda: self._closing,
            console=self._console.make(directory, self._reactor),
        )

    async def _create(self, name, vcpus, memory_mb, disk_gb, image, params):
        record = await define.define_vm(
            self._definer, name, vcpus, memory_mb, disk_gb, image, params
        )
        vm_id = record.vm_id
        self._vms[vm_id] = self._machine(record)
        self.log.info(
            "created VM {vm_id} ({name}): {vcpus} vCPU, {memory_mb} MB, {disk_gb} GB",
            vm_id=vm_id,
            name=name,
            vcpus=vcpus,
            memory_mb=memory_mb,
            disk_gb=disk_gb,
        )
        return record

    # -- start ----------------------------------------------------------------------

    async def _start(self, vm, was):
        if vm.record.state != "starting":
            # Deleted or stopped while we waited for the lock.
            raise InvalidVmState(f"cannot start VM {vm.vm_id}: it is {vm.record.state}")
        try:
            # Again at each start: a directory on the resolved image's way may have been
            # swapped for a symlink since the create.
            self._admission.images.check_stored(vm.record.image)
            if vm.record.image is not None:
                await disks.recheck_base(self._reactor, self._qemu_img, vm.record.image)
            accel = await self._accel.decided()
            await access.prepare(self._reactor, self._access, vm.record, vm.directory)
            await vm.launch(self._qemu, accel, self._start_timeout)
        except BaseException as e:
            self.start_failures += 1
            self.log.error("VM {vm_id} not started: {error}", vm_id=vm.vm_id, error=e)
            await access.release(self._reactor, vm.record)
            # Nothing of it runs: it is what it was before, and can be started again.
            self._set_state(vm, was)
            raise
        self.starts += 1
        self._set_state(vm, "running")
        self.log.info("VM {vm_id} running as QEMU pid {pid}", vm_id=vm.vm_id, pid=vm.pid())
        return vm.record

    # -- watching -------------------------------------------------------------------

    def _qmp_lost(self, vm, reason) -> None:
        if self._closing or vm.expect_exit or vm.record.state not in ("running",):
            return
        # QEMU is gone or out of our hands: its tap goes (a restart makes a new one).
        defer.Deferred.fromCoroutine(access.release(self._reactor, vm.record))
        if vm.guest_shutdown:
            # The guest powered off by itself: QEMU exits after SHUTDOWN, as asked.
            self.log.info("VM {vm_id} shut down by its guest", vm_id=vm.vm_id)
            process.remove_runtime(vm.directory)
            self._set_state(vm, "stopped")
            return
        self.log.error(
            "VM {vm_id}: lost QMP connection to its QEMU unexpectedly "
            "({why}); marking it error",
            vm_id=vm.vm_id,
            why=reason,
        )
        self._set_state(vm, "error")

    # -- stop and delete ------------------------------------------------------------

    async def _stop(self, vm, force):
        if vm.record.state not in ("running", "starting"):
            raise InvalidVmState(f"cannot stop VM {vm.vm_id}: it is {vm.record.state}")
        # Not claimed like a start: stopping must work on a full disk too.
        self._set_state(vm, "stopping")
        await vm.shut_down(force, self._stop_grace)
        await access.release(self._reactor, vm.record)
        self._set_state(vm, "stopped")
        self.log.info("VM {vm_id} stopped", vm_id=vm.vm_id)
        return vm.record

    async def _force_quit(self, vm):
        # The graceful stop holding the lock sees the connection go and finishes.
        await vm.quit()
        return await vm.lock.run(lambda: defer.succeed(vm.record))

    async def _delete(self, vm: Machine) -> bool:
        if self._vms.get(vm.vm_id) is not vm:
            raise VmNotFound(f"no VM {vm.vm_id!r}")
        if vm.record.state != "stopped":
            self._set_state(vm, "stopping")
            await vm.shut_down(True, self._stop_grace)
        await access.release(self._reactor, vm.record)
        del self._vms[vm.vm_id]
        # The definition goes first: a crash half-way through leaves a directory
        # without vm.json, which startService cleans up, never a VM without its disk.
        self._store.remove(vm.vm_id)
        self.log.info("deleted VM {vm_id} ({name})", vm_id=vm.vm_id, name=vm.record.name)
        return True

    # -- persistence ----------------------------------------------------------------

    def _set_state(self, vm: Machine, state, claim=None):
        """
        Change a VM's state and save it.  A claim (an action, e.g. ``"start"``) takes
        effect only once saved, else the action is refused; any other change has
        happened already, so a failed save is only logged.
        """
        record = attrs.evolve(vm.record, state=state)
        if self._vms.get(vm.vm_id) is vm:
            try:
                self._store.save(record)
            except OSError as e:
                if claim is not None:
                    raise InvalidVmState(
                        f"cannot {claim} VM {vm.vm_id}: could not record "
                        f"its state: {e.strerror or e}"
                    ) from None
                # A restart recovers transition states from the processes it finds.
                self.log.failure(
                    "VM {vm_id}: could not save state {state}", vm_id=vm.vm_id, state=state
                )
        vm.record = record
