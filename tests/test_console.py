"""
The node's serial console without QEMU: the bounded ring log (content, bound, mode,
reopening), and :class:`SerialConsole` against a stand-in serial peer (a Unix socket
served by the test where QEMU's chardev would be): output logged and fanned out, input
in order, the viewer limit, and viewers closed when the port goes.
"""

import os
import random
import stat

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import UNIXServerEndpoint

from hero_compute.node.qemu.console import (
    CONSOLE_LOG,
    ConsoleLog,
    ConsoleSettings,
    SerialConsole,
    console_route,
)
from hero_compute.rpc.errors import VmNotFound
from hero_compute.rpc.websocket import HTTPRefusal
from hero_compute.rpc.websocket_server import UpgradeRequest

from .support import until


def test_ring_keeps_the_last_bytes(tmp_path):
    """Whatever the sizes of the writes, the log holds exactly the last ``capacity``
    bytes, counts every byte seen, and its file never grows past header + capacity."""
    rng = random.Random(7)
    path = str(tmp_path / CONSOLE_LOG)
    log = ConsoleLog(path, 1000)
    everything = b""
    for _ in range(300):
        data = bytes(
            rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 333, 999, 2500]))
        )
        log.append(data)
        everything += data
        assert log.size == len(everything)
        for count in (0, 1, 10, 999, 1000, 5000):
            kept = min(count, 1000, len(everything))
            assert log.tail(count) == everything[len(everything) - kept :]
        assert os.path.getsize(path) <= 24 + 1000
    log.close()


def test_log_is_0600_and_survives_reopening(tmp_path):
    """The log file is 0600 whatever the umask, and a reopened log (a restarted node)
    has the same bytes and count and goes on from there."""
    path = str(tmp_path / CONSOLE_LOG)
    old = os.umask(0)
    try:
        log = ConsoleLog(path, 64)
        log.append(b"a" * 50 + b"hello world")
        log.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = ConsoleLog(path, 64)
    assert again.tail(11) == b"hello world" and again.size == 61
    again.append(b"!" * 10)
    assert again.tail(21) == b"hello world" + b"!" * 10 and again.size == 71
    again.close()
    smaller = ConsoleLog(path, 16)
    assert smaller.tail(100) == (b"hello world" + b"!" * 10)[-16:]
    assert smaller.size == 71
    assert os.path.getsize(path) <= 24 + 16
    smaller.close()


class Peer(protocol.Protocol):
    """The stand-in for QEMU's side of the serial socket."""

    def connectionMade(self):
        self.factory.peers.append(self)
        self.got = b""

    def dataReceived(self, data):
        self.got += data


class Viewed:
    """A fake WebSocket a viewer is attached to."""

    def __init__(self):
        self.sent = b""
        self.closed = None
        self.paused = False

    def send(self, data):
        self.sent += data

    def close(self, code, reason=""):
        self.closed = code

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False


@pytest_twisted.async_yield_fixture
async def serial(short_tmp):
    """A stand-in serial peer listening where QEMU would: ``(console, peers)``."""
    factory = protocol.Factory.forProtocol(Peer)
    factory.peers = []
    console = ConsoleSettings(log_size=4096, max_viewers=2).make(short_tmp, reactor)
    port = await UNIXServerEndpoint(reactor, console.socket_path).listen(factory)
    yield console, factory.peers
    console.disconnect()
    for peer in factory.peers:
        peer.transport.loseConnection()
    await defer.maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_output_input_and_limits(serial):
    """Output is logged and reaches every viewer from attach time on; input reaches the
    port in order; beyond max viewers 429; when the port goes, viewers are closed."""
    console, peers = serial
    with pytest.raises(HTTPRefusal) as refused:
        console.attach()
    assert refused.value.status == 409
    await console.connect()
    await until(lambda: peers)
    [peer] = peers
    peer.transport.write(b"boot line\n")
    await until(lambda: console.log.size == 10)
    first, second = console.attach(), console.attach()
    with pytest.raises(HTTPRefusal) as refused:
        console.attach()
    assert refused.value.status == 429
    a, b = Viewed(), Viewed()
    first.opened(a)
    second.opened(b)
    peer.transport.write(b"login: ")
    await until(lambda: a.sent == b"login: " and b.sent == b"login: ")
    for i in range(20):
        (first if i % 2 else second).received(b"%d," % i)
    await until(lambda: peer.got == b"".join(b"%d," % i for i in range(20)))
    assert console.read(100) == {"data": "boot line\nlogin: ", "size": 17}
    second.closed(1000)
    third = console.attach()
    third.opened(Viewed())
    peer.transport.loseConnection()
    await until(lambda: not console.connected)
    assert a.closed == 1001


def test_route_statuses(tmp_path):
    """The node's route: an unknown VM is 404; a VM whose console is not held is 409."""
    console = SerialConsole(str(tmp_path), reactor, 100, 1)

    def consoles(vm_id):
        if vm_id != "known":
            raise VmNotFound(vm_id)
        return console

    route = console_route(consoles)
    assert route.pattern.fullmatch("/v1/vms/known/console")
    for vm_id, status in (("other", 404), ("known", 409)):
        with pytest.raises(HTTPRefusal) as refused:
            route.accept(UpgradeRequest("console", {"vm_id": vm_id}, None))
        assert refused.value.status == status


def test_input_backpressure_pauses_viewers(tmp_path):
    """While QEMU does not take input, every viewer is not read, one attaching meanwhile
    too; all are read again once it drains."""
    console = SerialConsole(str(tmp_path), reactor, 100, 4)
    console._serial = object()  # held, as far as attaching goes
    first = console.attach()
    a = Viewed()
    first.opened(a)
    console.input_paused(True)
    b = Viewed()
    console.attach().opened(b)
    assert a.paused and b.paused
    console.input_paused(False)
    assert not a.paused and not b.paused


def test_never_started_vm_has_an_empty_log(tmp_path):
    """vm.console_log of a VM never started is empty and makes no file."""
    console = SerialConsole(str(tmp_path), reactor, 100, 1)
    assert console.read(50) == {"data": "", "size": 0}
    assert not os.path.exists(console.log.path)


def test_relay_backpressure_and_close():
    """The explorer's relay passes frames both ways, stops reading the caller while the
    node's leg is full, and closes one side when the other goes."""
    from hero_compute.explorer.console import Relay

    relay = Relay()
    caller, node = Viewed(), Viewed()
    caller.writable = node.writable = None
    relay.caller.opened(caller)
    relay.node.opened(node)
    relay.caller.received(b"typed")
    relay.node.received(b"printed")
    assert node.sent == b"typed" and caller.sent == b"printed"
    node.writable(False)
    assert caller.paused
    node.writable(True)
    assert not caller.paused
    relay.node.closed(1000)
    assert caller.closed == 1001
