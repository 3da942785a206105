"""
One VM as the manager drives it: its record, and its QEMU while it runs, spoken to over
QMP.  The manager decides the VM's state; a :class:`Machine` only does what it is told
to its QEMU and reports when QMP goes away.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, error, task
from twisted.logger import Logger

from hero_compute.node.qmp import connect_qmp
from hero_compute.node.vms import VmRecord
from hero_compute.rpc.errors import InvalidVmState

from . import process
from .store import QMP_SOCKET


@attrs.define(eq=False)
class Machine:
    """
    One VM and its QEMU.

    :ivar record: the current :class:`~hero_compute.node.vms.VmRecord`; replaced, never
        mutated
    :ivar directory: the VM's directory
    :ivar qmp: the live :class:`~hero_compute.node.qmp.QmpProtocol` while we watch its
        QEMU
    :ivar lock: serialises start/stop/delete/recovery of this VM
    :ivar expect_exit: we asked QEMU to go away, so losing QMP is not a failure
    :ivar guest_shutdown: QEMU reported ``SHUTDOWN``: QEMU exits next, on purpose
    :param reactor: provides ``IReactorProcess``, ``IReactorUNIX`` and ``IReactorTime``
    :param on_lost: called with this machine and the reason when its QMP connection
        ends
    :param closing: returns whether the manager is stopping (and leaves QEMU alone)
    """

    log = Logger()

    record: VmRecord
    directory: str
    _reactor: Any
    _on_lost: Callable[[Machine, Any], None]
    _closing: Callable[[], bool]
    #: The QMP connection while attached, or None
    qmp: Any = None
    #: The :class:`~.console.SerialConsole`, or None
    console: Any = None
    lock: defer.DeferredLock = attrs.field(factory=defer.DeferredLock)
    expect_exit: bool = False
    guest_shutdown: bool = False

    @property
    def vm_id(self) -> str:
        """The VM's id."""
        return self.record.vm_id

    def pid(self) -> int | None:
        """:return: the pid of this VM's QEMU if it runs, else ``None``"""
        return process.find_pid(self.directory)

    async def launch(self, qemu: str, accel: str, timeout: float) -> None:
        """
        Start QEMU for this VM and wait until it reports the VM running.

        :param qemu: the QEMU system emulator
        :param accel: QEMU's accelerator list
        :param timeout: seconds for QEMU to start and report ``running``
        :raise InvalidVmState: when it does not start, with QEMU's reason; nothing of
            it is left running then
        """
        try:
            await self._launch(qemu, accel, timeout)
        except BaseException as e:
            await self.abandon()
            if isinstance(e, (InvalidVmState, defer.CancelledError)):
                raise
            if isinstance(e, (defer.TimeoutError, error.TimeoutError)):
                raise InvalidVmState(
                    f"VM {self.vm_id} did not start within {timeout} s"
                ) from None
            # -32005 with QEMU's words rather than an opaque -32603: the operator needs
            # them, and they hold nothing secret.
            raise InvalidVmState(f"VM {self.vm_id} failed to start: {e}") from None

    async def _launch(self, qemu, accel, timeout) -> None:
        stale = self.pid()
        if stale is not None:
            # The VM errored while its QEMU lived on without QMP: that process is out
            # of our control and holds the disk's lock.
            self.log.warn(
                "killing stale QEMU {pid} of VM {vm_id}", pid=stale, vm_id=self.vm_id
            )
            process.kill(stale)
            await process.wait_gone(self._reactor, stale, 5)
        process.remove_runtime(self.directory)
        self.expect_exit = self.guest_shutdown = False
        await process.daemonize(
            self._reactor,
            qemu,
            process.qemu_argv(self.record, self.directory, accel),
            self.directory,
            timeout,
        )
        await self.attach(timeout)

    async def attach(self, timeout: float) -> None:
        """
        Connect to the VM's QMP socket, wait until QEMU reports it running and watch it.

        :param timeout: seconds for both
        """
        reactor = self._reactor
        deadline = reactor.seconds() + timeout
        if self.console is not None:
            self.console.connect()
        qmp = await connect_qmp(
            reactor,
            os.path.join(self.directory, QMP_SOCKET),
            on_event=self._event,
            timeout=timeout,
        )
        self.qmp = qmp
        qmp.when_disconnected().addCallback(self._lost, qmp)
        while True:
            d = qmp.execute("query-status")
            d.addTimeout(max(deadline - reactor.seconds(), 0.1), reactor)
            status = await d
            if status.get("running"):
                if self._closing():
                    # stopService ran meanwhile; it leaves QEMU alone, and so do we.
                    qmp.disconnect()
                return
            if reactor.seconds() > deadline:
                raise InvalidVmState(
                    f"VM {self.vm_id} is {status.get('status')!r}, not running"
                )
            await task.deferLater(reactor, 0.1, lambda: None)

    async def recover(self, timeout: float) -> str:
        """
        Take this VM back after the node restarted: reconnect to its QEMU if that runs.

        :param timeout: seconds for QMP to answer
        :return: the VM's state: ``"running"``, ``"stopped"`` when its QEMU is gone, or
            ``"error"`` when QEMU runs but QMP does not answer
        """
        pid = self.pid()
        if pid is None:
            self.log.info(
                "VM {vm_id} was {state} but its QEMU is gone; marking it stopped",
                vm_id=self.vm_id,
                state=self.record.state,
            )
            process.remove_runtime(self.directory)
            return "stopped"
        self.expect_exit = self.guest_shutdown = False
        try:
            await self.attach(timeout)
        except Exception as e:
            self.log.error(
                "VM {vm_id}: QEMU {pid} runs but QMP does not answer ({error}); "
                "marking it error",
                vm_id=self.vm_id,
                pid=pid,
                error=e,
            )
            if self.qmp is not None:
                self.expect_exit = True
                self.qmp.disconnect()
            return "error"
        self.log.info(
            "VM {vm_id} recovered: QEMU {pid} still running", vm_id=self.vm_id, pid=pid
        )
        return "running"

    def detach(self, timeout: float) -> defer.Deferred[Any]:
        """
        Close the QMP connection, if any, leaving QEMU running.

        :param timeout: seconds to wait for the connection to close
        :return: a Deferred that fires when it is closed
        """
        if self.console is not None:
            self.console.disconnect()
        if self.qmp is None:
            return defer.succeed(None)
        d = self.qmp.when_disconnected()
        d.addTimeout(timeout, self._reactor)
        self.qmp.disconnect()
        return d

    async def abandon(self) -> None:
        """Make sure nothing of a failed start keeps running."""
        self.expect_exit = True
        if self.console is not None:
            self.console.disconnect()
        if self.qmp is not None:
            self.qmp.disconnect()
            self.qmp = None
        pid = self.pid()
        if pid is not None:
            process.kill(pid)
            await process.wait_gone(self._reactor, pid, 5)
        process.remove_runtime(self.directory)

    async def shut_down(self, force: bool, grace: float) -> None:
        """
        End QEMU: ACPI power-down and ``grace`` seconds for the guest (unless
        ``force``), then ``quit``, then SIGKILL.

        :param force: skip the power-down
        :param grace: seconds the guest gets to power off
        """
        self.expect_exit = True
        pid = self.pid()
        qmp = self.qmp
        if qmp is not None:
            gone = qmp.when_disconnected()
            if not force:
                await self._quietly(qmp.execute("system_powerdown"), 5)
                await self._quietly(qmp.when_disconnected(), grace)
            if not gone.called:
                await self._quietly(qmp.execute("quit"), 5)
                await self._quietly(qmp.when_disconnected(), 10)
            qmp.disconnect()
        elif pid is not None:
            # No QMP (an errored VM whose QEMU lives on): nothing to ask politely.
            process.kill(pid)
        if pid is not None and not await process.wait_gone(self._reactor, pid, 10):
            self.log.warn(
                "VM {vm_id}: QEMU {pid} ignored quit; killing it", vm_id=self.vm_id, pid=pid
            )
            process.kill(pid)
            await process.wait_gone(self._reactor, pid, 5)
        process.remove_runtime(self.directory)

    async def quit(self) -> None:
        """Ask QEMU to quit at once, if we speak to it; no error if it does not answer."""
        if self.qmp is not None:
            await self._quietly(self.qmp.execute("quit"), 5)

    async def _quietly(self, d, timeout):
        """Wait for ``d`` at most ``timeout`` seconds; a failure or timeout is no error."""
        d.addTimeout(timeout, self._reactor)
        try:
            return await d
        except Exception:
            return None

    def _event(self, name, data, timestamp) -> None:
        if name == "SHUTDOWN":
            self.guest_shutdown = True
            self.log.info(
                "VM {vm_id}: QEMU shutting down ({reason})",
                vm_id=self.vm_id,
                reason=data.get("reason", "unknown"),
            )
        elif name in ("STOP", "RESUME", "RESET", "POWERDOWN", "GUEST_PANICKED"):
            self.log.info(
                "VM {vm_id}: QMP event {event} {data}",
                vm_id=self.vm_id,
                event=name,
                data=data,
            )

    def _lost(self, reason, qmp) -> None:
        if self.qmp is qmp:
            self.qmp = None
        self._on_lost(self, reason)
