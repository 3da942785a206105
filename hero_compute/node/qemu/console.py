"""
A VM's first serial port, kept by the node (CONTRACT §8): QEMU serves it on a Unix socket
chardev in the VM's directory (``server=on,wait=off``: QEMU never waits for us, and
takes us back after the node restarts), the node stays connected while the VM runs,
keeps the last bytes in a bounded log file and passes output to the viewers attached
over WebSocket and their input to the guest.

The log is a ring in one 0600 file: a header (capacity, total bytes seen) and at most
``capacity`` bytes, so it never grows past ``NODE_CONSOLE_LOG`` whatever the guest
prints, and a restarted node reads it back and goes on where it was.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any

import attrs
from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from hero_compute.rpc.errors import InvalidParams, VmNotFound
from hero_compute.rpc.sendnow import send_now
from hero_compute.rpc.websocket import (
    GOING_AWAY,
    HTTPRefusal,
    Route,
    UpgradeRequest,
    WebSocket,
)

log = Logger()

#: File names in a VM's directory.
TTY_SOCKET = "tty.sock"
CONSOLE_LOG = "console.log"

#: Defaults of ``NODE_CONSOLE_LOG`` and ``NODE_MAX_CONSOLES``.
DEFAULT_LOG = 1024 * 1024
DEFAULT_MAX_CONSOLES = 8

#: ``vm.console_log``'s default ``bytes``.
DEFAULT_TAIL = 65536

#: Tries, and seconds between them, to reach the serial socket of a QEMU just started.
CONNECT_TRIES = 100
CONNECT_PAUSE = 0.1

_HEADER = struct.Struct("<8sQQ")
_MAGIC = b"HCTTYLOG"

#: The console's path on every node listener.
PATH = re.compile(r"/v1/vms/(?P<vm_id>[A-Za-z0-9_.-]{1,64})/console/?")


def serial_args(directory: str) -> list[str]:
    """:return: QEMU's first serial port on the node's socket (QEMU never waits for it)"""
    path = os.path.join(directory, TTY_SOCKET).replace(",", ",,")
    return [
        "-chardev",
        f"socket,id=tty,path={path},server=on,wait=off",
        "-serial",
        "chardev:tty",
    ]


class ConsoleLog:
    """
    The last ``capacity`` bytes of a serial port, in a ring file.

    :param path: the file
    :param capacity: bytes kept at most
    """

    def __init__(self, path: str, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        self._fd: int | None = None
        #: Bytes seen in all (also those no longer kept).
        self.size = 0

    def open(self) -> None:
        """Open (or make) the file; one kept with another capacity is carried over."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        self._fd = fd
        head = os.pread(fd, _HEADER.size, 0)
        kept = b""
        if len(head) == _HEADER.size:
            magic, capacity, size = _HEADER.unpack(head)
            if magic == _MAGIC and capacity == self.capacity:
                self.size = size
                return
            if magic == _MAGIC and capacity:
                kept = self._read(fd, capacity, size, min(size, capacity))
                self.size = size - len(kept)
        os.ftruncate(fd, 0)
        self._save()
        self.append(kept)

    def close(self) -> None:
        """Close the file (reopened when used again)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _save(self) -> None:
        assert self._fd is not None
        os.pwrite(self._fd, _HEADER.pack(_MAGIC, self.capacity, self.size), 0)

    def append(self, data: bytes) -> None:
        """Keep ``data`` after what is kept, forgetting the oldest beyond capacity."""
        self.open()
        fd, capacity = self._fd, self.capacity
        assert fd is not None
        total = len(data)
        if not total:
            return
        if total > capacity:
            self.size += total - capacity
            data = data[-capacity:]
        at = self.size % capacity
        first = data[: capacity - at]
        os.pwrite(fd, first, _HEADER.size + at)
        if len(first) < len(data):
            os.pwrite(fd, data[len(first) :], _HEADER.size)
        self.size += len(data)
        self._save()

    def tail(self, count: int) -> bytes:
        """:return: the last ``count`` bytes kept (fewer if fewer are kept)"""
        self.open()
        assert self._fd is not None
        return self._read(self._fd, self.capacity, self.size, count)

    @staticmethod
    def _read(fd: int, capacity: int, size: int, count: int) -> bytes:
        count = max(0, min(count, size, capacity))
        start = (size - count) % capacity
        if start + count <= capacity:
            return os.pread(fd, count, _HEADER.size + start)
        first = os.pread(fd, capacity - start, _HEADER.size + start)
        return first + os.pread(fd, count - len(first), _HEADER.size)


@implementer(IPushProducer)
class _Serial(protocol.Protocol):
    """The node's connection to QEMU's serial socket."""

    transport: Any

    def __init__(self, console: SerialConsole) -> None:
        self._console = console

    def connectionMade(self) -> None:
        # What viewers type waits in our buffer only while QEMU reads it: beyond the
        # transport's buffer, the viewers stop being read (see pauseProducing).
        self.transport.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        self._console.output(data)

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self._console.serial_lost(self)

    def pauseProducing(self) -> None:
        self._console.input_paused(True)

    def resumeProducing(self) -> None:
        self._console.input_paused(False)

    def stopProducing(self) -> None:
        pass


class Viewer:
    """One WebSocket attached to a console (a ``websocket.Handler``)."""

    def __init__(self, console: SerialConsole) -> None:
        self._console = console
        self.socket: WebSocket | None = None

    def opened(self, socket: WebSocket) -> None:
        self.socket = socket
        if self._console.paused:
            socket.pause_reading()

    def received(self, data: bytes) -> None:
        self._console.input(data)

    def closed(self, code: int | None) -> None:
        self._console.detach(self)


class SerialConsole:
    """
    One VM's serial port: its connection, its log and its viewers.

    :param directory: the VM's directory
    :param reactor: provides ``IReactorUNIX`` and ``IReactorTime``
    :param log_size: bytes of output kept (``NODE_CONSOLE_LOG``)
    :param max_viewers: viewers at once (``NODE_MAX_CONSOLES``)
    """

    def __init__(
        self, directory: str, reactor: Any, log_size: int, max_viewers: int
    ) -> None:
        self.socket_path = os.path.join(directory, TTY_SOCKET)
        self.log = ConsoleLog(os.path.join(directory, CONSOLE_LOG), log_size)
        self._reactor = reactor
        self._max_viewers = max_viewers
        self.viewers: list[Viewer] = []
        self._serial: _Serial | None = None
        self._wanted = False
        self.paused = False

    @property
    def connected(self) -> bool:
        """Whether the node holds the serial port now."""
        return self._serial is not None

    def connect(self) -> defer.Deferred[None]:
        """
        Reach QEMU's serial socket (retrying while a QEMU just started makes it).

        :return: a Deferred that fires once connected or given up (never fails)
        """
        self._wanted = True
        if self._serial is not None:
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self._connect())

    async def _connect(self) -> None:
        endpoint = UNIXClientEndpoint(self._reactor, self.socket_path, timeout=2)
        factory = protocol.Factory.forProtocol(lambda: _Serial(self))  # type: ignore[arg-type]
        factory.noisy = False
        for _ in range(CONNECT_TRIES):
            if not self._wanted or self._serial is not None:
                return
            try:
                serial = await endpoint.connect(factory)
            except Exception:
                await task.deferLater(self._reactor, CONNECT_PAUSE, lambda: None)
                continue
            if not self._wanted or self._serial is not None:
                serial.transport.loseConnection()
                return
            self._serial = serial
            self.log.open()
            return
        log.warn("could not reach serial console {path}", path=self.socket_path)

    def disconnect(self) -> None:
        """Let go of the serial port (QEMU goes on running) and close the viewers."""
        self._wanted = False
        if self._serial is not None:
            # A transport defers its close while it holds a producer paused: let go.
            self._serial.transport.unregisterProducer()
            self._serial.transport.loseConnection()

    def serial_lost(self, serial: _Serial) -> None:
        """The serial connection is gone (QEMU exited, or we let go)."""
        if self._serial is serial:
            self._serial = None
        self.log.close()
        self.paused = False
        for viewer in list(self.viewers):
            if viewer.socket is not None:
                viewer.socket.close(GOING_AWAY, "the VM's console is gone")

    def output(self, data: bytes) -> None:
        """Guest output: logged, and sent to every viewer (a slow one is dropped)."""
        try:
            self.log.append(data)
        except OSError as e:
            log.warn("console log {path}: {e}", path=self.log.path, e=e)
        for viewer in list(self.viewers):
            if viewer.socket is not None:
                viewer.socket.send(data)

    def input(self, data: bytes) -> None:
        """What a viewer typed, in the order it arrived."""
        if self._serial is not None:
            send_now(self._serial.transport, data)

    def input_paused(self, paused: bool) -> None:
        """QEMU reads slower than viewers type: stop (or resume) reading them."""
        self.paused = paused
        for viewer in self.viewers:
            if viewer.socket is not None:
                if paused:
                    viewer.socket.pause_reading()
                else:
                    viewer.socket.resume_reading()

    def attach(self) -> Viewer:
        """
        :return: a new :class:`Viewer`
        :raise HTTPRefusal: 409 when the VM does not run, 429 when full
        """
        if self._serial is None:
            raise HTTPRefusal(409, "the VM is not running")
        if len(self.viewers) >= self._max_viewers:
            raise HTTPRefusal(
                429, f"{self._max_viewers} consoles are attached to this VM already"
            )
        viewer = Viewer(self)
        self.viewers.append(viewer)
        return viewer

    def detach(self, viewer: Viewer) -> None:
        """A viewer is gone."""
        if viewer in self.viewers:
            self.viewers.remove(viewer)

    def read(self, count: int | None = None) -> dict[str, Any]:
        """
        :param count: bytes wanted (``vm.console_log``'s ``bytes``), at most the log's
            capacity; None: :data:`DEFAULT_TAIL` or the capacity if smaller
        :return: ``vm.console_log``'s result
        :raise InvalidParams: ``count`` beyond the capacity
        """
        capacity = self.log.capacity
        if count is None:
            count = min(DEFAULT_TAIL, capacity)
        elif count > capacity:
            raise InvalidParams(f"bytes: at most {capacity} (NODE_CONSOLE_LOG) are kept")
        if self._serial is None and not os.path.exists(self.log.path):
            return {"data": "", "size": 0}  # never started: no file made by a read
        data = self.log.tail(count)
        if self._serial is None:
            self.log.close()
        return {"data": data.decode("utf-8", "replace"), "size": self.log.size}


@attrs.frozen
class ConsoleSettings:
    """
    :ivar log_size: bytes of output kept per VM (``NODE_CONSOLE_LOG``)
    :ivar max_viewers: viewers at once per VM (``NODE_MAX_CONSOLES``)
    """

    log_size: int = DEFAULT_LOG
    max_viewers: int = DEFAULT_MAX_CONSOLES

    def make(self, directory: str, reactor: Any) -> SerialConsole:
        """:return: the :class:`SerialConsole` of the VM in ``directory``"""
        return SerialConsole(directory, reactor, self.log_size, self.max_viewers)


def console_route(consoles: Any) -> Route:
    """
    The node's console route, ``GET /v1/vms/<vm_id>/console``.

    :param consoles: ``consoles(vm_id)`` -> the VM's :class:`SerialConsole`, raising
        :class:`~hero_compute.rpc.errors.VmNotFound`
    """

    def accept(request: UpgradeRequest) -> Viewer:
        vm_id = request.params["vm_id"]
        try:
            console = consoles(vm_id)
        except VmNotFound:
            raise HTTPRefusal(404, f"no VM {vm_id!r}") from None
        return console.attach()

    return Route("console", PATH, accept)
