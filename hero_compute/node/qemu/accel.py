"""
Which accelerator a node's VMs run under (``NODE_ACCEL``: ``auto``, ``kvm`` or ``tcg``).

Opening ``/dev/kvm`` proves little: on some hosts (nested virtualisation, a broken
hypervisor below) it opens, a guest starts, and then hangs as soon as it leaves real
mode.  So ``auto`` runs a tiny guest once, at start-up, under ``accel=kvm``: a 64 KiB
firmware image whose reset vector does what every x86-64 kernel does first (protected
mode, page tables, long mode) and then writes to QEMU's ``isa-debug-exit`` port, which
makes QEMU exit with a known code.  That exit within :data:`PROBE_TIMEOUT` seconds means
KVM works; anything else (QEMU refusing KVM, another exit code, no exit in time) means
TCG, and the log says why.

The probe's code (GNU as, linked at 0xF0000; the reset vector at 0xFFFF0 jumps to it)::

        .code16
        cli
        lgdtl %cs:(gdtdesc - _start)
        movl %cr0, %eax ; orl $1, %eax ; movl %eax, %cr0
        ljmpl $0x08, $pm32
        .code32
    pm32:
        movw $0x10, %ax ; movw %ax, %ds ; movw %ax, %es ; movw %ax, %ss
        movl $0x1000, %edi ; xorl %eax, %eax ; movl $0xc00, %ecx ; rep stosl
        movl $0x2003, 0x1000         # PML4 -> PDPT
        movl $0x3003, 0x2000         # PDPT -> PD
        movl $0x0083, 0x3000         # PD: one 2 MiB page at 0
        movl $0x1000, %eax ; movl %eax, %cr3
        movl %cr4, %eax ; orl $0x20, %eax ; movl %eax, %cr4        # PAE
        movl $0xc0000080, %ecx ; rdmsr ; orl $0x100, %eax ; wrmsr  # EFER.LME
        movl %cr0, %eax ; orl $0x80000000, %eax ; movl %eax, %cr0  # paging
        ljmpl $0x18, $lm64
        .code64
    lm64:
        movb $0x2a, %al ; outb %al, $0xf4      # QEMU exits with (0x2a << 1) | 1
    1:  hlt ; jmp 1b
    gdt: .quad 0, 0x00cf9a000000ffff, 0x00cf92000000ffff, 0x00af9a000000ffff
    gdtdesc: .word gdtdesc - gdt - 1 ; .long gdt
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

log = Logger()

#: The accelerators, as ``node.info`` reports them, and QEMU's ``accel=`` for each.
QEMU_ACCEL = {"kvm": "kvm", "tcg": "tcg"}
PROBE_TIMEOUT = 5.0
PROBE_EXIT = (0x2A << 1) | 1

_CODE = bytes.fromhex(
    "fa2e660f0116a8000f20c06683c8010f22c066ea1a000f00080066b810008ed88ec08ed0bf001000"
    "0031c0b9000c0000f3abc7050010000003200000c7050020000003300000c7050030000083000000"
    "b8001000000f22d80f20e083c8200f22e0b9800000c00f320d000100000f300f20c00d000000800f"
    "22c0ea81000f001800b02ae6f4f4ebfd0000000000000000ffff0000009acf00ffff00000092cf00"
    "ffff0000009aaf001f0088000f00"
)


def probe_firmware() -> bytes:
    """:return: the probe's 64 KiB firmware image (see the module's docstring)"""
    image = bytearray(b"\xf4" * 0x10000)
    image[: len(_CODE)] = _CODE
    # At the reset vector: ljmp $0xf000, $0x0000.
    image[0xFFF0:0xFFF5] = b"\xea\x00\x00\x00\xf0"
    return bytes(image)


class _Probe(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data) -> None:
        self.output = (self.output + data)[-4096:]

    errReceived = outReceived

    def processExited(self, reason) -> None:
        # Not processEnded: that also waits for every holder of the pipes to close.
        self.ended.callback(reason.value)


async def kvm_works(
    reactor: Any, qemu: str, timeout: float = PROBE_TIMEOUT
) -> tuple[bool, str]:
    """
    Run the probe guest under KVM.

    :param reactor: provides ``IReactorProcess`` and ``IReactorTime``
    :param qemu: the QEMU system emulator
    :param timeout: seconds the guest gets to reach long mode and exit
    :return: ``(True, why)`` if it did, else ``(False, why)``
    """
    with tempfile.TemporaryDirectory(prefix="hero-accel-") as tmp:
        firmware = os.path.join(tmp, "probe.bin")
        with open(firmware, "wb") as f:
            f.write(probe_firmware())
        argv = [qemu, "-machine", "accel=kvm", "-m", "16", "-nodefaults"]
        argv += ["-no-user-config", "-display", "none", "-bios", firmware]
        argv += ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
        # A guest hung in KVM never exits by itself: coreutils' timeout ends it even if
        # the node is killed before its own timer fires (and passes on our TERM).
        killer = shutil.which("timeout")
        if killer:
            argv = [killer, "-k", "2", f"{timeout + 5:g}", *argv]
        probe = _Probe()
        try:
            transport = reactor.spawnProcess(probe, argv[0], argv, env=os.environ)
        except Exception as e:  # OSError, or a reactor that cannot spawn at all
            return False, f"cannot run {qemu}: {e}"
        timer = reactor.callLater(timeout, _kill, transport)
        ended = await probe.ended
        if timer.active():
            timer.cancel()
        else:
            return False, f"a KVM guest did not reach long mode within {timeout:g} s"
    code = getattr(ended, "exitCode", None)
    if isinstance(ended, error.ProcessTerminated) and code == PROBE_EXIT:
        return True, "a KVM guest reached long mode"
    last = [ln for ln in probe.output.decode("utf-8", "replace").splitlines() if ln]
    return False, f"QEMU under KVM exited with {code}: {last[-1] if last else 'no output'}"


def _kill(transport) -> None:
    try:
        transport.signalProcess("TERM")
    except error.ProcessExitedAlready:
        pass


async def choose_accel(reactor: Any, qemu: str, mode: str) -> str:
    """
    Decide the accelerator, logging which and why.

    :param reactor: provides ``IReactorProcess`` and ``IReactorTime``
    :param qemu: the QEMU system emulator
    :param mode: ``NODE_ACCEL``: ``auto``, ``kvm`` or ``tcg``
    :return: ``"kvm"`` or ``"tcg"``
    """
    if mode in ("kvm", "tcg"):
        log.info("VMs run under {accel} (NODE_ACCEL={accel})", accel=mode)
        return mode
    works, why = await kvm_works(reactor, qemu)
    accel = "kvm" if works else "tcg"
    log.info("VMs run under {accel} (NODE_ACCEL=auto: {why})", accel=accel, why=why)
    return accel


class AccelChoice:
    """
    The node's accelerator: decided once, in the background, at start-up; starts of
    VMs wait for the decision.

    :param mode: ``NODE_ACCEL``: ``auto``, ``kvm`` or ``tcg``
    """

    def __init__(self, mode: str = "auto") -> None:
        self.mode = mode
        self.accel = None
        self._started = False
        self._waiting: list[defer.Deferred[Any]] = []

    def start(self, reactor: Any, qemu: str) -> None:
        """
        Decide, unless decided already.

        :param reactor: provides ``IReactorProcess`` and ``IReactorTime``
        :param qemu: the QEMU system emulator
        """
        if self.accel is None and not self._started:
            self._started = True
            d = defer.Deferred.fromCoroutine(choose_accel(reactor, qemu, self.mode))
            d.addErrback(self._probe_failed)
            d.addCallback(self._decided)

    def _probe_failed(self, failure) -> str:
        # Starts wait for a decision: never leave them waiting.
        log.warn(
            "VMs run under tcg (the KVM probe itself failed: {error})",
            error=failure.getErrorMessage(),
        )
        return "tcg"

    def _decided(self, accel) -> None:
        self.accel = accel
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(accel)

    def current(self) -> str:
        """:return: ``kvm`` or ``tcg``, or ``probing`` until decided"""
        return self.accel or "probing"

    def decided(self) -> defer.Deferred[str]:
        """:return: a Deferred firing with QEMU's ``accel=`` value once decided"""
        if self.accel is not None:
            return defer.succeed(QEMU_ACCEL[self.accel])
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d.addCallback(QEMU_ACCEL.__getitem__)
