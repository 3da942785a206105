"""
The JSON-RPC client against real servers in this process, over real Unix, TCP/IPv4 and
TCP/IPv6 sockets: results, persistent connections, and each way a call can fail.
"""

import socket
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web import resource, server

from hero_compute.rpc.addresses import parse_address
from hero_compute.rpc.codec import Parsed
from hero_compute.rpc.dispatch import Dispatcher
from hero_compute.rpc.errors import (
    BadResponse,
    CallTimedOut,
    ConnectionClosed,
    ConnectionRefused,
    InvalidParams,
    MethodNotFound,
    ResponseTooLarge,
    RpcError,
    TransportError,
    VmNotFound,
)
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.http_server import make_factory
from hero_compute.rpc.listen import Listen
from hero_compute.rpc.listeners import Listeners

from .support import failure_result_of, success_result_of, until


async def eventually(predicate, timeout=5.0, what="condition"):
    """Let the reactor run until ``predicate()`` is true; fail after ``timeout`` s."""
    await until(predicate, timeout=timeout, interval=0.01, what=what)


class Server:
    """
    The RPC server under test: its bound URIs, the server-side connections it accepted,
    and what its handlers saw.
    """

    def __init__(self, directory):
        self.connections = []
        self.open = set()
        self.notified = []
        self.cancelled = []
        self.directory = directory
        rpc = Dispatcher()
        rpc.register("echo", lambda value=None: value)
        rpc.register("where", lambda context: context.transport, context=True)
        rpc.register("note", self.notified.append)
        rpc.register("vm_missing", self._vm_missing)
        rpc.register("custom", self._custom)
        rpc.register("forever", self._forever)
        site = make_factory(rpc)
        outer = self

        class Counting(site.protocol):
            def connectionMade(self):
                outer.connections.append(self)
                outer.open.add(self)
                super().connectionMade()

            def connectionLost(self, reason):
                outer.open.discard(self)
                super().connectionLost(reason)

        site.protocol = Counting
        self.listeners = Listeners(
            site,
            [
                Listen.unix(f"{self.directory}/rpc.sock"),
                "tcp:0:interface=127.0.0.1",
                r"tcp6:0:interface=\:\:1",
            ],
        )

    @staticmethod
    def _vm_missing(vm_id):
        raise VmNotFound(f"no VM {vm_id}", data={"vm_id": vm_id})

    @staticmethod
    def _custom():
        raise RpcError("custom failure", data=[1, "two"], code=-32099)

    def _forever(self):
        return defer.Deferred(lambda d: self.cancelled.append(True))

    def uri(self, kind):
        """The bound URI of one kind: unix, tcp or tcp6."""
        for uri in self.listeners.bound:
            if kind == "unix" and uri.startswith("unix://"):
                return uri
            if kind == "tcp" and uri.startswith("tcp://") and "[" not in uri:
                return uri
            if kind == "tcp6" and uri.startswith("tcp://["):
                return uri
        raise AssertionError(f"no {kind} listener in {self.listeners.bound}")


@pytest_twisted.async_yield_fixture
async def rpc_server(short_tmp):
    """The RPC server, listening on unix, tcp 127.0.0.1:0 and tcp6 [::1]:0."""
    srv = Server(short_tmp)
    srv.listeners.startService()
    assert len(srv.listeners.bound) == 3
    yield srv
    await srv.listeners.stopService()
    for conn in list(srv.open):
        conn.transport.abortConnection()
    await eventually(lambda: not srv.open, what="server connections to close")


@pytest_twisted.async_yield_fixture
async def client():
    """An RpcClient with a 5 s default timeout, closed at the end."""
    rpc_client = RpcClient(reactor, timeout=5.0, connect_timeout=2.0)
    yield rpc_client
    await rpc_client.close()


@pytest_twisted.async_yield_fixture
async def raw_server():
    """
    Listen with any protocol factory on 127.0.0.1:0: ``raw_server(factory)`` returns the
    tcp:// URI.  Ports are closed and accepted connections aborted at the end.
    """
    ports = []
    accepted = []

    def start(factory):
        build = factory.buildProtocol

        def tracking(addr):
            proto = build(addr)
            accepted.append(proto)
            return proto

        factory.buildProtocol = tracking
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return f"tcp://127.0.0.1:{port.getHost().port}"

    yield start
    for port in ports:
        await port.stopListening()
    for proto in accepted:
        transport = getattr(proto, "transport", None)
        if transport is not None and transport.connected:
            transport.abortConnection()
    await eventually(
        lambda: all(
            not getattr(p, "transport", None) or not p.transport.connected for p in accepted
        ),
        what="the aborted connections to close",
    )


# Results -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, transport", [("unix", "unix"), ("tcp", "tcp"), ("tcp6", "tcp")]
)
@pytest_twisted.ensureDeferred
async def test_call_over_each_listener(rpc_server, client, kind, transport):
    """The client reaches one server over unix://, tcp:// and tcp://[v6] alike."""
    uri = rpc_server.uri(kind)
    assert await client.call(uri, "echo", {"value": [1, "é", None]}) == [1, "é", None]
    assert await client.call(uri, "echo", ["positional"]) == "positional"
    assert await client.call(uri, "echo") is None
    assert await client.call(uri, "where") == transport


@pytest_twisted.ensureDeferred
async def test_call_with_address_object(rpc_server, client):
    """An Address works where a URI does."""
    address = parse_address(rpc_server.uri("tcp"))
    assert await client.call(address, "echo", ["x"]) == "x"


@pytest_twisted.ensureDeferred
async def test_notify(rpc_server, client):
    """A notification runs the method and fires with None."""
    assert await client.notify(rpc_server.uri("unix"), "note", ["hello"]) is None
    assert rpc_server.notified == ["hello"]


# Connections ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connections_are_reused(rpc_server, client):
    """Sequential calls to one peer reuse one persistent connection per address."""
    for kind in ("unix", "tcp", "tcp6"):
        for n in range(5):
            assert await client.call(rpc_server.uri(kind), "echo", [n]) == n
    assert len(rpc_server.connections) == 3


@pytest_twisted.ensureDeferred
async def test_concurrent_calls_then_reuse(rpc_server, client):
    """Concurrent calls open at most one connection each, and later calls reuse them."""
    uri = rpc_server.uri("tcp")
    results = await defer.gatherResults([client.call(uri, "echo", [n]) for n in range(3)])
    assert results == [0, 1, 2]
    opened = len(rpc_server.connections)
    assert 1 <= opened <= 3
    for n in range(4):
        await client.call(uri, "echo", [n])
    assert len(rpc_server.connections) == opened


@pytest_twisted.ensureDeferred
async def test_as_many_idle_connections_as_calls_per_node_are_kept(rpc_server, client):
    """Rounds of 16 concurrent calls (the explorer's default per-node limit) reuse the
    connections of the first round: none is closed on release and reopened."""
    uri = rpc_server.uri("unix")
    for _ in range(3):
        results = await defer.gatherResults(
            [client.call(uri, "echo", [n]) for n in range(16)]
        )
        assert results == list(range(16))
    assert len(rpc_server.connections) == 16
    assert len(rpc_server.open) == 16


@pytest_twisted.ensureDeferred
async def test_close_closes_pooled_connections(rpc_server, client):
    """close() closes the pooled connections, as the server sees it."""
    await client.call(rpc_server.uri("unix"), "echo", [1])
    await client.call(rpc_server.uri("tcp"), "echo", [1])
    assert len(rpc_server.open) == 2
    await client.close()
    await eventually(lambda: not rpc_server.open, timeout=5, what="connections to close")


@pytest_twisted.ensureDeferred
async def test_local_host_is_our_end_of_the_connection(rpc_server, client):
    """local_host gives our address on a connection to the peer, and the next call
    reuses that connection."""
    assert await client.local_host(rpc_server.uri("tcp")) == "127.0.0.1"
    assert await client.local_host(rpc_server.uri("tcp6")) == "::1"
    opened = len(rpc_server.connections)
    assert await client.call(rpc_server.uri("tcp"), "echo", [1]) == 1
    assert len(rpc_server.connections) == opened


# Failures ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_missing_unix_socket_is_refused(client, short_tmp):
    """A Unix socket that does not exist is ConnectionRefused, at once."""
    started = time.monotonic()
    with pytest.raises(ConnectionRefused) as info:
        await client.call(f"unix://{short_tmp}/nope.sock", "echo")
    assert time.monotonic() - started < 1
    assert "nope.sock" in str(info.value)


@pytest_twisted.ensureDeferred
async def test_closed_tcp_port_is_refused(client):
    """A TCP port nothing listens on is ConnectionRefused, at once."""
    # Bound and held, never listening: refused, and no other socket can listen on the
    # port meanwhile (closed before use, it was anyone's to take).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ConnectionRefused) as info:
            await client.call(f"tcp://127.0.0.1:{port}", "echo")
        assert time.monotonic() - started < 1
    assert info.value.address == parse_address(f"tcp://127.0.0.1:{port}")


class _Silent(protocol.Protocol):
    """Accepts a connection and never answers."""


class _HangUp(protocol.Protocol):
    """Reads a request's headers, then closes the connection without answering."""

    def connectionMade(self):
        self.buffer = b""

    def dataReceived(self, data):
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_silent_server_times_out(raw_server, client):
    """A server that accepts but never answers is CallTimedOut after the call's timeout."""
    uri = raw_server(protocol.Factory.forProtocol(_Silent))
    started = time.monotonic()
    with pytest.raises(CallTimedOut) as info:
        await client.call(uri, "echo", timeout=0.3)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 2
    assert "0.3" in str(info.value)


@pytest_twisted.ensureDeferred
async def test_slow_method_times_out_and_is_cancelled(rpc_server, client):
    """A method that never returns is CallTimedOut, and the server cancels it when the
    client gives up."""
    with pytest.raises(CallTimedOut):
        await client.call(rpc_server.uri("unix"), "forever", timeout=0.3)
    await eventually(lambda: rpc_server.cancelled, what="the server to cancel the call")
    # The timed-out connection is not reused; the next call still works.
    assert await client.call(rpc_server.uri("unix"), "echo", [1]) == 1


@pytest_twisted.ensureDeferred
async def test_hang_up_is_connection_closed(raw_server, client):
    """A server that closes the connection after reading the request is ConnectionClosed."""
    uri = raw_server(protocol.Factory.forProtocol(_HangUp))
    with pytest.raises(ConnectionClosed):
        await client.call(uri, "echo", timeout=5)


class _Fixed(resource.Resource):
    """Answers every POST with a fixed status and body."""

    isLeaf = True

    def __init__(self, code, body):
        resource.Resource.__init__(self)
        self._code = code
        self._body = body

    def render_POST(self, request):
        request.setResponseCode(self._code)
        return self._body


class _CloseDelimited(protocol.Protocol):
    """Answers with neither a length nor chunks: the body ends with the connection."""

    def dataReceived(self, data):
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
            b'{"jsonrpc": "2.0", "result": "whole", "id": 1}'
        )
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_close_delimited_response(raw_server, client):
    """A response whose body ends with the connection (no length, no chunks) is read
    whole."""
    uri = raw_server(protocol.Factory.forProtocol(_CloseDelimited))
    assert await client.call(uri, "echo", timeout=5) == "whole"


@pytest_twisted.ensureDeferred
async def test_calls_after_close_still_work(rpc_server, client):
    """After close(), a call opens a fresh connection instead of reusing a closing one."""
    uri = rpc_server.uri("tcp")
    assert await client.call(uri, "echo", [1]) == 1
    closed = client.close()
    assert await client.call(uri, "echo", [2]) == 2
    await closed


@pytest_twisted.ensureDeferred
async def test_local_host_of_a_unix_address_is_refused(rpc_server, client):
    """A Unix socket has no host address: local_host says so instead of failing
    inside."""
    with pytest.raises(ValueError):
        await client.local_host(rpc_server.uri("unix"))


def test_cancelled_connect_is_timed_out():
    """A call timeout that cancels a connection still being made is CallTimedOut."""
    from twisted.internet.error import ConnectingCancelledError
    from twisted.python.failure import Failure

    from hero_compute.rpc.http_client import _transport_failure

    address = parse_address("tcp://127.0.0.1:9")
    with pytest.raises(CallTimedOut):
        _transport_failure(Failure(ConnectingCancelledError(None)), address, 1.0)


class _Garbage(protocol.Protocol):
    """Answers any request with bytes that are not HTTP."""

    def dataReceived(self, data):
        self.transport.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_not_http_is_bad_response(raw_server, client):
    """A peer answering something other than HTTP is BadResponse, and the client goes
    on working with other peers."""
    uri = raw_server(protocol.Factory.forProtocol(_Garbage))
    with pytest.raises(BadResponse) as info:
        await client.call(uri, "echo", timeout=5)
    assert "not an HTTP response" in str(info.value)


@pytest.mark.parametrize(
    "code, body, complaint",
    [
        (200, b"this is not json", "not JSON"),
        (200, b"[1, 2]", "not a JSON-RPC response"),
        (200, b'{"jsonrpc": "2.0", "id": 1}', "neither result nor error"),
        (200, b'{"jsonrpc": "2.0", "error": "bad", "id": 1}', "error member"),
        (500, b"<html>oops</html>", "HTTP 500"),
        (404, b"not here", "HTTP 404"),
        (200, b" " * (16 * 1024 * 1024 + 1), "larger than"),
        (200, b'{"jsonrpc": "2.0", "result": NaN, "id": 1}', "not JSON"),
        (200, b'{"jsonrpc": "2.0", "result": [-Infinity], "id": 1}', "not JSON"),
        (200, b'{"jsonrpc": "2.0", "result": {"x": 1e400}, "id": 1}', "not JSON"),
        (
            200,
            b'{"jsonrpc": "2.0", "result": 2' + b"0" * 30 + b'e400, "id": 1}',
            "not JSON",
        ),
        (200, b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (200, b'\xff{"jsonrpc": "2.0", "result": 1, "id": 1}', "not JSON"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_response(raw_server, client, code, body, complaint):
    """An answer that is not a JSON-RPC response is BadResponse, saying why."""
    uri = raw_server(server.Site(_Fixed(code, body)))
    with pytest.raises(BadResponse) as info:
        await client.call(uri, "echo")
    assert complaint in str(info.value)
    assert isinstance(info.value, TransportError)
    # The proxy tells a reply over its limit (logged as a refusal) from the others.
    assert isinstance(info.value, ResponseTooLarge) == (complaint == "larger than")


# JSON-RPC errors -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_method_not_found(rpc_server, client):
    """An unknown method is MethodNotFound, carrying code and message."""
    with pytest.raises(MethodNotFound) as info:
        await client.call(rpc_server.uri("tcp"), "no.such.method")
    assert info.value.code == -32601
    assert "no.such.method" in info.value.message


@pytest_twisted.ensureDeferred
async def test_invalid_params(rpc_server, client):
    """Params that do not fit are InvalidParams."""
    with pytest.raises(InvalidParams) as info:
        await client.call(rpc_server.uri("unix"), "echo", [1, 2, 3])
    assert info.value.code == -32602


@pytest_twisted.ensureDeferred
async def test_application_error_keeps_code_message_data(rpc_server, client):
    """A handler's domain error comes back as the same class, with message and data."""
    with pytest.raises(VmNotFound) as info:
        await client.call(rpc_server.uri("tcp6"), "vm_missing", {"vm_id": "vm-7"})
    assert info.value.code == -32004
    assert info.value.message == "no VM vm-7"
    assert info.value.data == {"vm_id": "vm-7"}


@pytest_twisted.ensureDeferred
async def test_unknown_error_code(rpc_server, client):
    """An error code without a class of its own is a plain RpcError with that code."""
    with pytest.raises(RpcError) as info:
        await client.call(rpc_server.uri("unix"), "custom")
    assert type(info.value) is RpcError
    assert (info.value.code, info.value.message, info.value.data) == (
        -32099,
        "custom failure",
        [1, "two"],
    )


def test_dns_failure_is_refused():
    """A host name that does not resolve is a connect failure (the explorer's -32003),
    not an unexpected error."""
    from twisted.internet.error import DNSLookupError
    from twisted.python.failure import Failure

    from hero_compute.rpc.http_client import _transport_failure

    address = parse_address("tcp://nowhere.invalid:9003")
    with pytest.raises(ConnectionRefused):
        _transport_failure(Failure(DNSLookupError("nowhere.invalid")), address, 5.0)


@pytest.mark.parametrize(
    "body, result",
    [
        (
            b'{"jsonrpc":"2.0","result":{"a":[1,2.5,"\\u00e9",null,true]},"id":1}',
            {"a": [1, 2.5, "é", None, True]},
        ),
        # Past 64 bits: exact, as JSON says, never rounded to a float.
        (
            b'{"jsonrpc":"2.0","result":123456789012345678901234567890,"id":1}',
            123456789012345678901234567890,
        ),
        (
            b'{"jsonrpc":"2.0","result":"18446744073709551616","id":1}',
            "18446744073709551616",
        ),
        # What json always read from bytes: a byte order mark, UTF-16.
        (b'\xef\xbb\xbf{"jsonrpc":"2.0","result":7,"id":1}', 7),
        ('{"jsonrpc":"2.0","result":8,"id":1}'.encode("utf-16"), 8),
        # A lone surrogate escape is legal JSON text.
        (b'{"jsonrpc":"2.0","result":"\\ud800","id":1}', "\ud800"),
        (b'{"jsonrpc":"2.0","result":1e308,"id":1}', 1e308),
        (
            b'{"jsonrpc":"2.0","error":{"code":-32004,"message":"m"},"result":1,"id":1}',
            VmNotFound,
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_results_parse_as_json_says(raw_server, client, body, result):
    """Replies are read as they always were, whichever parser takes them: big integers
    stay exact, lone surrogate escapes pass, a byte order mark or UTF-16 is understood,
    and an error member wins over a result."""
    uri = raw_server(server.Site(_Fixed(200, body)))
    if isinstance(result, type):
        with pytest.raises(result):
            await client.call(uri, "echo")
    else:
        got = await client.call(uri, "echo")
        assert got == result and type(got) is type(result)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b'{"jsonrpc":"2.0","result":{"a":[1,null]},"id":1}', Parsed),
        (b'{"jsonrpc":"2.0","result":{"a":123456789012345678901234567890},"id":1}', dict),
        (b'{"jsonrpc":"2.0","result":[1,null],"id":1}', list),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_relaying_client_marks_objects_orjson_read(raw_server, body, kind):
    """RpcClient(relay=True), the explorer's proxy's, gives an object orjson read as a
    Parsed (written back without the NaN walk), anything else as it was, equal to what
    a plain client gives."""
    uri = raw_server(server.Site(_Fixed(200, body)))
    relaying = RpcClient(reactor, timeout=5.0, relay=True)
    plain = RpcClient(reactor, timeout=5.0)
    try:
        got = await relaying.call(uri, "echo")
        expected = await plain.call(uri, "echo")
    finally:
        await relaying.close()
        await plain.close()
    assert type(got) is kind and got == expected


class _Recorder(protocol.Protocol):
    """Records the request bodies it is sent and answers each with a fixed result."""

    bodies: list

    def dataReceived(self, data):
        head, _, body = data.partition(b"\r\n\r\n")
        self.factory.bodies.append(body)
        answer = b'{"jsonrpc":"2.0","result":1,"id":1}'
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
        )


@pytest_twisted.ensureDeferred
async def test_request_bodies(raw_server, client):
    """Requests and notifications are the JSON-RPC objects they always were, ASCII on
    the wire."""
    import json

    factory = protocol.Factory.forProtocol(_Recorder)
    factory.bodies = []
    uri = raw_server(factory)
    await client.call(uri, "m.one")
    await client.call(uri, "m.two", {"x": ["é", 1.5, None]})
    await client.notify(uri, "m.three", [1])
    first, second, third = (json.loads(body) for body in factory.bodies)
    assert first == {"jsonrpc": "2.0", "method": "m.one", "id": first["id"]}
    assert isinstance(first["id"], int) and second["id"] != first["id"]
    assert second["params"] == {"x": ["é", 1.5, None]}
    assert third == {"jsonrpc": "2.0", "method": "m.three", "params": [1]}
    assert all(body.isascii() for body in factory.bodies)


# Deadlines and sending, in memory -------------------------------------------------------


def _memory_connection(max_per_peer=4):
    """A pool on a Clock and one of its connections over a StringTransport."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from hero_compute.rpc.http_pool import HTTPConnection, Pool

    clock = Clock()
    pool = Pool(clock, 5.0, max_per_peer)
    address = parse_address("tcp://192.0.2.1:9002")
    conn = HTTPConnection(pool, address, (address, None))
    conn.makeConnection(StringTransport())
    pool._track(conn)
    return clock, pool, conn


_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


def test_call_times_out_at_its_deadline():
    """A request not answered within its timeout fails with TimeoutError at that
    moment, not before, and the connection is aborted."""
    from hero_compute.rpc.http_client import POOL_IDLE

    clock, pool, conn = _memory_connection()
    done = conn.request(b"{}", 3.0)
    clock.advance(2.9)
    assert not done.called
    clock.advance(0.1)
    failure = failure_result_of(done)
    failure.trap(defer.TimeoutError)
    assert conn.transport.disconnecting
    # A timeout longer than the idle time, on a fresh connection.
    clock, pool, conn = _memory_connection()
    done = conn.request(b"{}", POOL_IDLE + 40)
    clock.advance(POOL_IDLE + 39)
    assert not done.called
    clock.advance(1)
    failure_result_of(done).trap(defer.TimeoutError)


def test_deadlines_move_later_without_new_timers():
    """Calls and releases on a busy connection move its deadline later without
    scheduling a timer each; the idle deadline still closes it, the call deadline
    still times a call out."""
    from hero_compute.rpc.http_client import POOL_IDLE

    clock, pool, conn = _memory_connection()
    timers = []
    schedule = clock.callLater
    clock.callLater = lambda *a, **kw: timers.append(a) or schedule(*a, **kw)
    for n in range(100):
        assert n == 0 or pool.take(conn.key) is conn
        done = conn.request(b"{}", 90.0)
        clock.advance(1)
        conn.dataReceived(_OK)  # keep-alive: back in the pool
        assert success_result_of(done) == (200, b"{}")
    # One timer for the first request, one for its release (sooner), then one each
    # time a timer came due and found the deadline moved (every POOL_IDLE seconds).
    assert len(timers) <= 4, timers
    assert len(clock.getDelayedCalls()) == 1
    # Idle: closed POOL_IDLE after its last release, not before.
    clock.advance(POOL_IDLE - 1)
    assert not conn.transport.disconnecting
    assert pool.take(conn.key) is conn
    done = conn.request(b"{}", 90.0)
    clock.advance(89.5)
    assert not done.called
    clock.advance(0.5)
    failure_result_of(done).trap(defer.TimeoutError)
    assert conn.transport.disconnecting


def test_idle_connection_closes_after_pool_idle():
    """A released connection closes POOL_IDLE seconds later, unless taken again."""
    from hero_compute.rpc.http_client import POOL_IDLE

    clock, pool, conn = _memory_connection()
    done = conn.request(b"{}", 1.0)
    conn.dataReceived(_OK)
    success_result_of(done)
    assert pool.take(conn.key) is conn
    pool.release(conn)
    clock.advance(POOL_IDLE - 0.5)
    assert not conn.transport.disconnecting
    clock.advance(0.5)
    assert conn.transport.disconnecting
    conn.connectionLost(Failure(ConnectionDone()))
    assert pool.take(conn.key) is None and not clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_small_requests_are_sent_at_once(rpc_server, client):
    """A request is written to the socket during the call, not left in the transport's
    buffer for the reactor's next turn (plain TCP and Unix)."""
    from hero_compute.rpc.sendnow import send_now

    for kind in ("unix", "tcp"):
        uri = rpc_server.uri(kind)
        assert await client.call(uri, "echo", [1]) == 1
        conn = client._pool.take((parse_address(uri), None))
        transport = conn.transport
        send_now(transport, b"")  # nothing: nothing buffered, nothing sent
        done = conn.request(b'{"jsonrpc":"2.0","method":"echo","params":[2],"id":9}', 5)
        assert (transport.dataBuffer, transport._tempDataLen) == (b"", 0)
        assert (await done)[0] == 200


def test_long_method_names_are_not_cached():
    """A request head is cached for short method names only: a proxied method name is
    the caller's, and 256 names of a megabyte must not stay in memory."""
    from hero_compute.rpc import http_client

    http_client._request_head.cache_clear()
    assert http_client._message("node.info", None, 1) == (
        b'{"jsonrpc":"2.0","method":"node.info","id":1}'
    )
    long_name = "node." + "x" * 100_000
    body = http_client._message(long_name, {"a": 1}, 2)
    assert body.startswith(b'{"jsonrpc":"2.0","method":"node.xxx') and body.endswith(
        b',"params":{"a":1},"id":2}'
    )
    assert http_client._request_head.cache_info().currsize == 1


def test_params_too_deep_to_encode_fail_the_deferred():
    """Params nested past the encoder's depth fail the call's Deferred with -32602
    (call, notify and relay alike), never raise at the caller, who may have counted
    the call in flight; nothing is sent."""
    from twisted.internet import reactor

    from hero_compute.rpc.errors import InvalidParams
    from hero_compute.rpc.http_client import RpcClient

    from .support import failure_result_of

    nested: list = []
    for _ in range(1000):
        nested = [nested]
    client = RpcClient(reactor)
    for d in (
        client.call("unix:///nowhere.sock", "node.info", {"x": nested}),
        client.notify("unix:///nowhere.sock", "node.info", {"x": nested}),
        client.relay("unix:///nowhere.sock", "node.info", {"x": nested}, 5.0, None),
    ):
        assert failure_result_of(d).check(InvalidParams)
