"""
The proxy's one-callback path (``RpcClient.relay`` read by ``RpcClient.outcome``) gives
exactly what ``RpcClient.call`` gives, for every outcome, over real sockets; the proxy
on it frees its room and says -32003 as before; and the lean epoll loop reads, logs a
protocol's failure and drops only that connection.
"""

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web import server

from hero_compute.explorer.proxy import Proxy
from hero_compute.rpc.addresses import parse_address
from hero_compute.rpc.codec import Parsed
from hero_compute.rpc.errors import NodeUnreachable, RpcError
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.twisted_private import lean_poll

from . import test_http_client as _hc
from .test_http_client import _Fixed, _HangUp, _Silent
from .test_proxy import never, registry_with

# The client tests' servers and client, as fixtures here too.
rpc_server, client, raw_server = _hc.rpc_server, _hc.client, _hc.raw_server


async def _both(d):
    """The value or the exception a Deferred ends with."""
    outcome = await d.addBoth(lambda r: [r])
    value = outcome[0]
    if isinstance(value, Failure):
        return type(value.value), str(value.value)
    return value


async def _relayed(client, uri, method, params=None, timeout=5.0):
    address = parse_address(uri)
    raw = await client.relay(address, method, params, timeout).addBoth(lambda r: [r])
    return client.outcome(raw[0], address, timeout)


async def _compare(client, uri, method, params=None, timeout=5.0):
    """call's outcome and relay+outcome's, side by side."""
    called = await _both(client.call(uri, method, params, timeout=timeout))
    relayed = await _both(
        defer.ensureDeferred(_relayed(client, uri, method, params, timeout))
    )
    return called, relayed


@pytest.mark.parametrize(
    "method, params",
    [("echo", {"value": [1, "é", None]}), ("vm_missing", ["x"]), ("custom", None)],
)
@pytest_twisted.ensureDeferred
async def test_relay_gives_what_call_gives(rpc_server, client, method, params):
    """A result and a node's JSON-RPC errors come out of relay+outcome as from call."""
    called, relayed = await _compare(client, rpc_server.uri("unix"), method, params)
    assert called == relayed
    if method != "echo":
        assert issubclass(relayed[0], RpcError)


@pytest.mark.parametrize(
    "answer, kind",
    [
        (protocol.Factory.forProtocol(_Silent), "CallTimedOut"),
        (protocol.Factory.forProtocol(_HangUp), "ConnectionClosed"),
        (server.Site(_Fixed(500, b"<html>oops</html>")), "BadResponse"),
        (server.Site(_Fixed(200, b'{"jsonrpc": "2.0", "result": NaN, "id": 1}')), "Bad"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_relay_fails_as_call_fails(raw_server, client, answer, kind):
    """A silent peer, a hang-up, an HTTP error and a non-JSON answer fail relay+outcome
    with call's own TransportError and text."""
    called, relayed = await _compare(client, raw_server(answer), "echo", timeout=0.3)
    assert called == relayed
    assert relayed[0].__name__.startswith(kind)


@pytest_twisted.ensureDeferred
async def test_relay_refused_as_call_is(client):
    """Nothing listening: ConnectionRefused from both, naming the address."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    called, relayed = await _compare(client, f"tcp://127.0.0.1:{port}", "echo")
    assert called == relayed and relayed[0].__name__ == "ConnectionRefused"


@pytest_twisted.ensureDeferred
async def test_relaying_client_still_marks_objects():
    """The explorer's client (relay=True) gives the proxy Parsed objects here too."""
    rpc_client = RpcClient(reactor, timeout=5.0, connect_timeout=2.0, relay=True)
    try:
        raw = b'{"jsonrpc": "2.0", "result": {"a": [1, null]}, "id": 1}'
        address = parse_address("tcp://127.0.0.1:1")
        result = rpc_client.outcome((200, raw), address, 5.0)
        assert type(result) is Parsed and result == {"a": [1, None]}
    finally:
        await rpc_client.close()


@pytest_twisted.ensureDeferred
async def test_proxy_on_a_real_client_frees_room_and_says_unreachable(
    rpc_server, short_tmp
):
    """Through a real RpcClient, a node's result passes, a dead socket is -32003 naming
    the node, and each call frees its place in flight."""
    rpc_client = RpcClient(reactor, timeout=5.0, connect_timeout=2.0, relay=True)
    clock = Clock()
    registry = registry_with(
        clock,
        ("up", rpc_server.uri("unix"), False),
        ("down", f"unix://{short_tmp}/nope.sock", False),
    )
    proxy = Proxy(rpc_client, registry, 5, never)
    try:
        # vm.* is what the proxy lets through; the test server has no such method.
        with pytest.raises(NodeUnreachable, match="node down at .*nope.sock"):
            await proxy.call("down", "vm.list")
        assert proxy.total == 0 and not proxy.in_flight
        with pytest.raises(RpcError, match="Method not found"):
            await proxy.call("up", "vm.list")
        assert proxy.total == 0 and not proxy.in_flight
    finally:
        await rpc_client.close()


class _Reader(protocol.Protocol):
    def __init__(self, got, fail=False):
        self.got, self.fail = got, fail

    def dataReceived(self, data):
        if self.fail:
            raise RuntimeError("boom")
        self.got.append(data)

    def connectionLost(self, reason):
        self.got.append("lost")
        if self.fail == "lost too":
            raise RuntimeError("lost badly")


def test_lean_poll_reads_and_drops_only_a_failing_connection(logged_errors):
    """The lean loop hands each ready socket its data; a protocol that raises is logged
    and its connection closed (a connectionLost that raises too is logged), the others
    are served in the same turn and keep reading."""
    from twisted.internet import tcp

    r = EPollReactor()
    assert lean_poll(r)
    assert not lean_poll(Clock())
    got_good, got_bad, got_worse = [], [], []
    pairs = []
    try:
        for got, fail in ((got_good, False), (got_bad, True), (got_worse, "lost too")):
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            proto = _Reader(got, fail)
            conn = tcp.Connection(ours, proto, r)
            proto.makeConnection(conn)
            conn.startReading()
            pairs.append((conn, ours, theirs))
        for _, _, theirs in pairs:
            theirs.send(b"hello")
        r.doIteration(0.5)
        assert got_good == [b"hello"]
        assert got_bad == got_worse == ["lost"]
        flushed = sorted(repr(e) for e in logged_errors.flush())
        assert len(flushed) == 3
        assert sum("boom" in e for e in flushed) == 2
        assert sum("lost badly" in e for e in flushed) == 1
        pairs[0][2].send(b"again")
        r.doIteration(0.5)
        assert got_good == [b"hello", b"again"]
    finally:
        for conn, ours, theirs in pairs:
            theirs.close()
            r.removeReader(conn)
            ours.close()
        r._poller.close()
