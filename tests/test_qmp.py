"""
Tests for :obj:`hero_compute.node.qmp`: the QMP client protocol over in-memory transports.
"""

import json

import pytest
from twisted.internet import defer, error, protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import failure
from twisted.test import iosim

from hero_compute.node.qmp import (
    QmpCommandError,
    QmpConnectionLost,
    QmpError,
    QmpProtocol,
    connect_qmp,
)

from .support import failure_result_of, success_result_of

GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}},
        "capabilities": ["oob"],
    }
}


def _line(obj):
    return json.dumps(obj).encode() + b"\r\n"


def _sent(transport):
    """
    :param transport: a :obj:`StringTransport`
    :return: the JSON messages written to it since the last call, emptying it
    """
    data = transport.value()
    transport.clear()
    return [json.loads(line) for line in data.splitlines() if line.strip()]


@pytest.fixture
def events():
    """:return: a list the protocol's events are appended to"""
    return []


@pytest.fixture
def qmp(events):
    """:return: a connected :obj:`QmpProtocol` that has not yet seen the greeting"""
    proto = QmpProtocol(on_event=lambda *event: events.append(event))
    proto.makeConnection(StringTransport())
    return proto


def _handshake(proto):
    """
    Play QEMU's side of the handshake.

    :param proto: a fresh :obj:`QmpProtocol`
    """
    proto.dataReceived(_line(GREETING))
    assert _sent(proto.transport) == [{"execute": "qmp_capabilities"}]
    proto.dataReceived(_line({"return": {}}))


def test_handshake(qmp):
    """The client negotiates capabilities after the greeting and only then is ready."""
    ready = qmp.when_ready()
    assert not ready.called
    assert qmp.transport.value() == b""
    qmp.dataReceived(_line(GREETING))
    assert _sent(qmp.transport) == [{"execute": "qmp_capabilities"}]
    assert not ready.called
    qmp.dataReceived(_line({"return": {}}))
    assert success_result_of(ready) == GREETING["QMP"]
    assert success_result_of(qmp.when_ready()) == GREETING["QMP"]


def test_execute_before_ready(qmp):
    """A command before the handshake is done fails instead of confusing QEMU."""
    failure_result_of(qmp.execute("query-status"), QmpError)
    assert qmp.transport.value() == b""


def test_replies_in_order(qmp):
    """Replies are matched to commands in the order the commands were sent."""
    _handshake(qmp)
    first = qmp.execute("query-status")
    second = qmp.execute("system_powerdown")
    third = qmp.execute("human-monitor-command", {"command-line": "info version"})
    assert _sent(qmp.transport) == [
        {"execute": "query-status"},
        {"execute": "system_powerdown"},
        {"execute": "human-monitor-command", "arguments": {"command-line": "info version"}},
    ]
    qmp.dataReceived(
        _line({"return": {"status": "running", "running": True}}) + _line({"return": {}})
    )
    assert success_result_of(first) == {"status": "running", "running": True}
    assert success_result_of(second) == {}
    assert not third.called
    qmp.dataReceived(_line({"return": "7.2.0\r\n"}))
    assert success_result_of(third) == "7.2.0\r\n"


def test_events_between_replies(qmp, events):
    """Events go to the handler and do not consume a pending command's reply."""
    _handshake(qmp)
    d = qmp.execute("system_powerdown")
    qmp.dataReceived(
        _line({"event": "POWERDOWN", "timestamp": {"seconds": 10, "microseconds": 500000}})
        + _line({"return": {}})
        + _line(
            {
                "event": "SHUTDOWN",
                "data": {"guest": True, "reason": "guest-shutdown"},
                "timestamp": {"seconds": 11, "microseconds": 0},
            }
        )
    )
    assert success_result_of(d) == {}
    assert events == [
        ("POWERDOWN", {}, 10.5),
        ("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}, 11.0),
    ]


def test_event_handler_failure_is_contained(qmp, logged_errors):
    """
    An event handler that raises is logged and does not break the session.

    :param logged_errors: the conftest's collector of logged errors
    """
    _handshake(qmp)

    def boom(*event):
        raise RuntimeError("handler bug")

    qmp._on_event = boom
    d = qmp.execute("query-status")
    qmp.dataReceived(_line({"event": "STOP"}) + _line({"return": {"running": False}}))
    assert success_result_of(d) == {"running": False}
    assert qmp.transport.connected
    assert len(logged_errors.flush(RuntimeError)) == 1


def test_command_error(qmp):
    """An error reply fails that command with QEMU's class and description."""
    _handshake(qmp)
    bad = qmp.execute("nope")
    good = qmp.execute("query-status")
    qmp.dataReceived(
        _line(
            {
                "error": {
                    "class": "CommandNotFound",
                    "desc": "The command nope has not been found",
                }
            }
        )
        + _line({"return": {"running": True}})
    )
    f = failure_result_of(bad, QmpCommandError)
    assert f.value.error_class == "CommandNotFound"
    assert "nope" in str(f.value)
    assert success_result_of(good) == {"running": True}


def test_connection_lost_fails_pending(qmp):
    """Losing the connection fails pending commands and fires when_disconnected."""
    _handshake(qmp)
    d = qmp.execute("quit")
    gone = qmp.when_disconnected()
    qmp.connectionLost(failure.Failure(error.ConnectionDone()))
    failure_result_of(d, QmpConnectionLost)
    assert isinstance(success_result_of(gone), error.ConnectionDone)
    assert isinstance(success_result_of(qmp.when_disconnected()), error.ConnectionDone)
    failure_result_of(qmp.execute("query-status"), QmpError)


def test_connection_lost_before_ready(qmp):
    """Losing the connection during the handshake fails when_ready."""
    ready = qmp.when_ready()
    qmp.dataReceived(_line(GREETING))
    qmp.connectionLost(failure.Failure(error.ConnectionLost()))
    failure_result_of(ready, QmpConnectionLost)


def test_bad_greeting_aborts(qmp):
    """A peer that does not greet like QEMU is disconnected and never ready."""
    ready = qmp.when_ready()
    qmp.dataReceived(_line({"return": {}}))
    assert qmp.transport.disconnecting or not qmp.transport.connected
    qmp.connectionLost(failure.Failure(error.ConnectionAborted()))
    failure_result_of(ready, QmpConnectionLost)


@pytest.mark.parametrize(
    "garbage",
    [b"not json\r\n", b"[1, 2]\r\n", _line({"surprise": 1}), _line({"return": {}})],
)
def test_protocol_errors_abort(qmp, garbage):
    """Non-JSON, non-objects, unknown messages and unsolicited replies close the session."""
    _handshake(qmp)
    qmp.dataReceived(garbage)
    assert qmp.transport.disconnecting or not qmp.transport.connected


def test_refused_capabilities(qmp):
    """QEMU refusing the capabilities negotiation fails when_ready and disconnects."""
    ready = qmp.when_ready()
    qmp.dataReceived(_line(GREETING))
    qmp.dataReceived(_line({"error": {"class": "GenericError", "desc": "no"}}))
    failure_result_of(ready, QmpError)
    assert qmp.transport.disconnecting


def test_split_and_joined_lines(qmp):
    """Messages split across reads or joined in one read are both understood."""
    ready = qmp.when_ready()
    data = _line(GREETING)
    for i in range(len(data)):
        qmp.dataReceived(data[i : i + 1])
    _sent(qmp.transport)
    qmp.dataReceived(_line({"return": {}}))
    success_result_of(ready)


def test_cancelled_command_keeps_order(qmp):
    """A command given up on (timeout) still takes its reply, so later ones stay matched."""
    _handshake(qmp)
    first = qmp.execute("query-status")
    first.cancel()
    failure_result_of(first, defer.CancelledError)
    second = qmp.execute("query-kvm")
    qmp.dataReceived(
        _line({"return": {"running": True}}) + _line({"return": {"enabled": False}})
    )
    assert success_result_of(second) == {"enabled": False}


class FakeQemu(protocol.Protocol):
    """
    QEMU's side of QMP, just enough for the handshake and ``query-status``.

    :ivar greet: whether to send the greeting on connect
    """

    def __init__(self, greet=True):
        self.greet = greet
        self.received = []

    def connectionMade(self):
        if self.greet:
            self.transport.write(_line(GREETING))

    def dataReceived(self, data):
        for line in data.splitlines():
            message = json.loads(line)
            self.received.append(message)
            if message["execute"] == "qmp_capabilities":
                self.transport.write(_line({"return": {}}))
            elif message["execute"] == "query-status":
                self.transport.write(
                    _line({"event": "RESUME"}) + _line({"return": {"running": True}})
                )


def _connect(reactor, server):
    """
    Connect the client the reactor was asked for to ``server`` through iosim.

    :param reactor: a :obj:`MemoryReactorClock` after :obj:`connect_qmp`
    :param server: the peer protocol
    :return: the :obj:`IOPump`
    """
    factory = reactor.unixClients[0][1]
    client = factory.buildProtocol(None)
    pump = iosim.connect(
        server,
        iosim.FakeTransport(server, isServer=True),
        client,
        iosim.FakeTransport(client, isServer=False),
    )
    pump.flush()
    return pump


def test_connect_qmp_waits_for_handshake():
    """connect_qmp fires with a ready protocol after the handshake, over a real byte
    stream."""
    reactor = MemoryReactorClock()
    events = []
    d = connect_qmp(
        reactor, "/run/vm/qmp.sock", on_event=lambda *e: events.append(e), timeout=5
    )
    assert reactor.unixClients[0][0] == "/run/vm/qmp.sock"
    qemu = FakeQemu()
    pump = _connect(reactor, qemu)
    proto = success_result_of(d)
    assert isinstance(proto, QmpProtocol)
    assert qemu.received == [{"execute": "qmp_capabilities"}]
    status = proto.execute("query-status")
    pump.flush()
    assert success_result_of(status) == {"running": True}
    assert events == [("RESUME", {}, None)]


def test_connect_qmp_times_out():
    """connect_qmp gives up, closing the connection, when QEMU never greets."""
    reactor = MemoryReactorClock()
    d = connect_qmp(reactor, "/run/vm/qmp.sock", timeout=5)
    pump = _connect(reactor, FakeQemu(greet=False))
    assert not d.called
    reactor.advance(5)
    pump.flush()
    failure_result_of(d, defer.TimeoutError, error.TimeoutError)
    assert pump.clientIO.disconnecting or pump.clientIO.disconnected
