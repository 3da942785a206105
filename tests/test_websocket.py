"""
WebSocket (RFC 6455) on our HTTP protocol: the upgrade hook, frames both ways, ping,
close, refusals with an HTTP status, authorization by the roles table, and explicit
backpressure (a client that does not read is dropped, not the producer nor the others).

An in-process server on real Unix sockets, with the blocking test client
(``tests/wsclient.py``, wsproto over a plain socket) in a thread; our own client side
(``websocket_client.connect``) against the same server.
"""

import re
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import UNIXClientEndpoint
from wsproto import ConnectionType, WSConnection
from wsproto.events import BytesMessage, Request

from hero_compute.rpc.authz import NODE_POLICY
from hero_compute.rpc.dispatch import Dispatcher
from hero_compute.rpc.errors import RefusedByPolicy
from hero_compute.rpc.http_server import make_factory
from hero_compute.rpc.limits import Limits
from hero_compute.rpc.listen import Listen
from hero_compute.rpc.listeners import Listeners
from hero_compute.rpc.websocket import HTTPRefusal
from hero_compute.rpc.websocket_client import connect
from hero_compute.rpc.websocket_server import Route, Routes

from .support import post
from .wsclient import WsClient, refusal


class Echo:
    """A handler that sends back what it gets, and remembers it."""

    instances: list = []

    def __init__(self):
        self.socket = None
        self.got = b""
        self.code = "open"
        Echo.instances.append(self)

    def opened(self, socket):
        self.socket = socket

    def received(self, data):
        self.got += data
        self.socket.send(data)

    def closed(self, code):
        self.code = code


class Firehose:
    """A handler to which the server pushes output, like a console's guest."""

    def __init__(self, hose):
        self.socket = None
        self._hose = hose

    def opened(self, socket):
        self.socket = socket
        self._hose.viewers.append(self)

    def received(self, data):
        pass

    def closed(self, code):
        self._hose.viewers.remove(self)
        self._hose.closed.append(self)


class Hose:
    """Pushes 8 KiB to every viewer per tick, whether they read or not."""

    def __init__(self):
        self.viewers = []
        self.closed = []
        self.sent = 0
        self.loop = task.LoopingCall(self.tick)

    def tick(self):
        chunk = b"x" * 8192
        for viewer in list(self.viewers):
            viewer.socket.send(chunk)
        self.sent += 1


def _accept_echo(request):
    if request.params["name"] == "busy":
        raise HTTPRefusal(429, "too many")
    if request.params["name"] == "later":
        # Accepted a reactor turn later: the Deferred is unfired when returned.
        return task.deferLater(reactor, 0, Echo)
    return Echo()


def _authorize(context, route, params):
    if params.get("name") == "secret":
        raise RefusedByPolicy("not for you")
    NODE_POLICY.check_route(context.transport, context.identity, route, params)


@pytest_twisted.async_yield_fixture
async def server(short_tmp):
    """An RPC server with WebSocket routes on a Unix socket: ``(uri, hose)``."""
    hose = Hose()
    rpc = Dispatcher()
    rpc.register("sum", lambda a, b: a + b)
    factory = make_factory(rpc, limits=Limits(max_unsent=128 * 1024))
    factory.upgrade = Routes(
        [
            Route("console", re.compile(r"/echo/(?P<name>[a-z]+)"), _accept_echo),
            Route("console", re.compile(r"/hose"), lambda request: Firehose(hose)),
        ],
        _authorize,
        128 * 1024,
    )
    path = f"{short_tmp}/ws.sock"
    listeners = Listeners(factory, [Listen.unix(path)])
    listeners.startService()
    Echo.instances = []
    yield f"unix://{path}", hose
    if hose.loop.running:
        hose.loop.stop()
    await listeners.stopService()


def in_thread(f, *args, **kwargs):
    """Run blocking client code in a thread, bounded by its own socket timeouts."""
    return threads.deferToThread(f, *args, **kwargs)


@pytest_twisted.ensureDeferred
async def test_frames_both_ways(server):
    """Binary and text messages reach the handler, its answers reach the client, a ping
    is answered with a pong, and a close is answered with the same code."""
    uri, _ = server

    def talk():
        client = WsClient(uri, "/echo/one")
        client.send(b"\x00\x01binary\xff")
        client.read_until(b"binary\xff")
        client.send_text("héllo")
        client.read_until("héllo".encode())
        client.ping(b"abc")
        deadline = time.monotonic() + client.timeout
        while not client.pongs and time.monotonic() < deadline:
            client.pump(deadline)
        client.close_handshake(1000)
        closed = client.wait_closed()
        return client, closed

    client, closed = await in_thread(talk)
    assert bytes(client.received) == b"\x00\x01binary\xff" + "héllo".encode()
    assert client.pongs == [b"abc"]
    assert closed and client.close_code == 1000
    [echo] = Echo.instances
    assert echo.got == b"\x00\x01binary\xff" + "héllo".encode()
    assert echo.code == 1000


@pytest_twisted.ensureDeferred
async def test_refusals_have_http_statuses(server):
    """An unknown path is 404, a route's refusal its own status (429), a caller the
    roles table refuses 403; the RPC endpoint keeps answering on the same listener."""
    uri, _ = server
    assert await in_thread(refusal, uri, "/nowhere") == 404
    assert await in_thread(refusal, uri, "/echo/busy") == 429
    assert await in_thread(refusal, uri, "/echo/secret") == 403
    assert await in_thread(refusal, uri, "/echo/later") is None
    status, _, body = await in_thread(
        post, uri, {"jsonrpc": "2.0", "method": "sum", "params": [1, 2], "id": 1}
    )
    assert status == 200 and b'"result":3' in body.replace(b" ", b"")


@pytest_twisted.ensureDeferred
async def test_bad_upgrade_is_400(server):
    """An upgrade without a WebSocket key is refused with 400, and nothing is opened."""
    uri, _ = server
    from .test_http_server import raw_socket, read_until_closed

    def ask():
        sock = raw_socket(uri)
        sock.sendall(
            b"GET /echo/one HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        return read_until_closed(sock)

    answer = await in_thread(ask)
    assert answer.startswith(b"HTTP/1.1 400")
    assert Echo.instances == []


@pytest_twisted.ensureDeferred
async def test_non_reading_client_is_dropped_not_the_others(server):
    """A client that stops reading is dropped once its unsent bytes pass max_unsent;
    the producer goes on and a reading client keeps getting everything."""
    uri, hose = server
    slow = await in_thread(WsClient, uri, "/hose", 10.0, 4096)
    fast = await in_thread(WsClient, uri, "/hose")
    hose.loop.start(0.005)
    dropped = []

    def read_fast():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not dropped:
            fast.pump(time.monotonic() + 0.05)
        before = len(fast.received)
        fast.read_until(b"x", start=before)
        return len(fast.received)

    reading = in_thread(read_fast)
    for _ in range(400):
        if hose.closed:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    dropped.append(True)
    received = await reading
    assert [v.socket.dropped for v in hose.closed] == [True]
    assert len(hose.viewers) == 1 and hose.loop.running
    assert received > 128 * 1024
    slow.sock.close()
    fast.close()


@pytest_twisted.ensureDeferred
async def test_our_client(server):
    """Our client side opens a WebSocket, exchanges frames, and fails with the server's
    HTTP status when refused."""
    uri, _ = server
    path = uri[len("unix://") :]
    got = defer.Deferred()

    class Handler:
        def opened(self, socket):
            socket.send(b"ping!")

        def received(self, data):
            if not got.called:
                got.callback(data)

        def closed(self, code):
            pass

    endpoint = UNIXClientEndpoint(reactor, path)
    socket = await connect(endpoint, "localhost", "/echo/me", Handler(), 65536, 5, reactor)
    assert await got == b"ping!"
    socket.close()
    with pytest.raises(HTTPRefusal) as refused:
        await connect(endpoint, "localhost", "/echo/busy", Handler(), 65536, 5, reactor)
    assert refused.value.status == 429 and "too many" in refused.value.message


@pytest_twisted.ensureDeferred
async def test_pipelined_upgrade_answers_earlier_requests_first(server):
    """An upgrade sent right behind an RPC request on one connection is taken over only
    once that request is answered, and frames sent behind it reach the handler."""
    uri, _ = server
    from .test_http_server import raw_socket

    body = b'{"jsonrpc": "2.0", "method": "sum", "params": [2, 3], "id": 1}'
    ws = WSConnection(ConnectionType.CLIENT)
    upgrade = ws.send(Request(host="x", target="/echo/piped"))

    def talk():
        sock = raw_socket(uri)
        sock.sendall(
            b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s%s"
            % (len(body), body, upgrade)
        )
        data = b""
        while b"101 " not in data:
            data += sock.recv(65536)
        ws.receive_data(data[data.index(b"HTTP/1.1 101") :])
        list(ws.events())
        sock.sendall(ws.send(BytesMessage(data=b"after")))
        got = b""
        while b"after" not in got:
            ws.receive_data(sock.recv(65536))
            got += b"".join(e.data for e in ws.events() if isinstance(e, BytesMessage))
        sock.close()
        return data

    data = await in_thread(talk)
    assert data.replace(b" ", b"").index(b'"result":5') < data.replace(b" ", b"").index(
        b"HTTP/1.1101"
    )
    assert Echo.instances[0].got == b"after"
