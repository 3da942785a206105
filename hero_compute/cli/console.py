"""
``hero-compute vm console NODE VM`` and ``vm log NODE VM [--bytes N]``: a VM's serial
console through the explorer.

``console`` is like ``virsh console``: the terminal goes raw (every key goes to the
guest, Ctrl-C included) and ``Ctrl-]`` detaches; the VM keeps running.  Input that is
not a terminal (a pipe) is sent as it comes, and its end detaches too.
"""

from __future__ import annotations

import argparse
import os
import sys
import termios
import tty
from typing import TYPE_CHECKING, Any

from rich.text import Text
from twisted.internet import defer
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

from . import exits
from .connect import HTTPRefusal
from .vms import resolve

if TYPE_CHECKING:
    from .connect import Explorer
    from .output import Output


#: The byte of Ctrl-], which detaches (as in telnet and virsh).
DETACH = b"\x1d"

#: Exit codes for the statuses a console may be refused with.
_REFUSED = {
    403: exits.REFUSED,
    404: exits.NOT_FOUND,
    409: exits.FAILED,
    429: exits.REFUSED,
    502: exits.UNREACHABLE,
}


def add_commands(
    cmds: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """
    Add ``console`` and ``log`` to the ``vm`` group.

    :param cmds: the ``vm`` group's subparsers action
    :param common: the parent parser of the global options
    """
    console = cmds.add_parser(
        "console",
        parents=[common],
        help="attach to a VM's serial console (Ctrl-] detaches)",
    )
    console.add_argument("node_id", metavar="NODE")
    console.add_argument("vm", metavar="VM", help="VM id or name")
    console.set_defaults(run=console_vm)
    log = cmds.add_parser("log", parents=[common], help="the end of a VM's console output")
    log.add_argument("node_id", metavar="NODE")
    log.add_argument("vm", metavar="VM", help="VM id or name")
    log.add_argument(
        "--bytes", type=int, default=None, metavar="N", help="[default: 65536]"
    )
    log.set_defaults(run=console_log)


async def console_log(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``vm log NODE VM [--bytes N]``."""
    vm = await resolve(explorer, args.node_id, args.vm)
    params = {"vm_id": vm["vm_id"]}
    if args.bytes is not None:
        params["bytes"] = args.bytes
    result = await explorer.node_call(args.node_id, "vm.console_log", params)
    output.emit(result, lambda r: Text(r["data"]))
    return 0


class _Session:
    """The console's WebSocket handler: output to the terminal."""

    def __init__(self, write) -> None:
        self._write = write
        self.socket: Any = None
        self.done: defer.Deferred = defer.Deferred()

    def opened(self, socket) -> None:
        self.socket = socket

    def received(self, data) -> None:
        self._write(data)

    def closed(self, code) -> None:
        if not self.done.called:
            self.done.callback(code)

    def keys(self, data) -> None:
        """What was typed: sent, up to a Ctrl-] (or the end of input), which detaches."""
        if data and DETACH not in data:
            self.socket.send(data)
            return
        before = data.split(DETACH, 1)[0] if data else b""
        if before:
            self.socket.send(before)
        self.socket.close()
        if not self.done.called:
            self.done.callback(None)


@implementer(IReadDescriptor)
class _Keys:
    """Standard input, read by the reactor."""

    def __init__(self, fd, session) -> None:
        self._fd = fd
        self._session = session

    def fileno(self):
        return self._fd

    def doRead(self):
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        self._session.keys(data)
        return None

    def connectionLost(self, reason) -> None:
        pass

    def logPrefix(self) -> str:
        return "stdin"


def _write_out(data) -> None:
    out = sys.stdout.buffer
    out.write(data)
    out.flush()


async def console_vm(explorer: Explorer, args: argparse.Namespace, output: Output) -> int:
    """``vm console NODE VM``."""
    vm = await resolve(explorer, args.node_id, args.vm)
    session = _Session(_write_out)
    try:
        await explorer.console(args.node_id, vm["vm_id"], session)
    except HTTPRefusal as e:
        raise exits.Failure(
            f"console of VM {vm['name']} on {args.node_id} refused: {e.message}",
            _REFUSED.get(e.status, exits.FAILED),
        ) from None
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    if saved is not None:
        sys.stderr.write(
            f"Connected to VM {vm['name']} on {args.node_id}; Ctrl-] detaches.\r\n"
        )
        tty.setraw(fd)
    keys = _Keys(fd, session)
    explorer.reactor.addReader(keys)
    try:
        await session.done
    finally:
        explorer.reactor.removeReader(keys)
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            sys.stderr.write("\r\nDetached.\n")
    return 0
