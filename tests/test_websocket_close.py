"""
A WebSocket that ends, refused or closed by either side, ends its TCP connection too, on
both ends and over Unix, TCP and TLS alike: a connection left open is a descriptor an
attacker can make us keep, one per upgrade.
"""

import re
import socket as stdlib_socket
import ssl
import struct

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)

from hero_compute.rpc.addresses import parse_listen
from hero_compute.rpc.dispatch import Dispatcher
from hero_compute.rpc.errors import RefusedByPolicy
from hero_compute.rpc.http_server import make_factory
from hero_compute.rpc.listen import Listen
from hero_compute.rpc.listeners import Listeners
from hero_compute.rpc.tls import ClientTLS, Expected, ServerTLS, TLSMaterial
from hero_compute.rpc.websocket import CLOSE_TIMEOUT, HTTPRefusal
from hero_compute.rpc.websocket_client import connect
from hero_compute.rpc.websocket_server import Route, Routes

from .test_node_tls import cert_for

#: Upgrades of each kind a test makes.
N = 4

#: Seconds the connections get to go: well under CLOSE_TIMEOUT, so that it is the close
#: itself that ends them, not the timer that cuts off a peer that does not answer (3 s,
#: not 1: TLS closes take several reactor turns, more on a loaded machine).
SETTLE = 3.0


class Console:
    """A route's handler that greets, and closes first if ``server_closes``."""

    def __init__(self, server_closes=False):
        self.server_closes = server_closes
        self.codes = []

    def opened(self, socket):
        socket.send(b"welcome")
        if self.server_closes:
            socket.close()

    def received(self, data):
        pass

    def closed(self, code):
        self.codes.append(code)


def _authorize(context, route, params):
    if params["name"] == "secret":
        raise RefusedByPolicy("not for you")


def _server(kind, fleet, clock=reactor):
    """A listener of ``kind`` with the routes ``/ws/<name>`` (``secret``: 403) and
    ``/bye/<name>`` (the server closes at once): ``(factory, listeners, endpoint)``."""
    factory = make_factory(Dispatcher())
    factory.upgrade = Routes(
        [
            Route("console", re.compile(r"/ws/(?P<name>\w+)"), lambda r: Console()),
            Route("console", re.compile(r"/bye/(?P<name>\w+)"), lambda r: Console(True)),
        ],
        _authorize,
        65536,
        clock,
    )
    if kind == "unix":
        path = f"{fleet['dir']}/ws.sock"
        listeners = Listeners(factory, [Listen.unix(path)], reactor=reactor)
        listeners.startService()
        return factory, listeners, UNIXClientEndpoint(reactor, path)
    listeners = Listeners(factory, [], reactor=reactor)
    if kind == "tcp":
        listeners = Listeners(factory, ["tcp:0:interface=127.0.0.1"], reactor=reactor)
    else:
        server_tls = TLSMaterial(*cert_for(fleet, "node", "n1"), fleet["ca"])
        listeners.add_tls(parse_listen("127.0.0.1:0"), ServerTLS(server_tls), reactor)
    listeners.startService()
    port = int(listeners.bound[0].rsplit(":", 1)[1])
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if kind == "tls":
        material = TLSMaterial(*fleet["client/ops"], fleet["ca"])
        endpoint = wrapClientTLS(ClientTLS(material, Expected("node", "n1")), endpoint)
    return factory, listeners, endpoint


def _clients():
    """The reactor's client connections now."""
    return {
        s
        for s in set(reactor.getReaders()) | set(reactor.getWriters())
        if type(s).__name__ == "Client"
    }


async def _settled(factory, clients_before):
    """Wait up to SETTLE s for the server and the client to hold no connection:
    ``(server connections, client connections)`` left."""
    for _ in range(int(SETTLE / 0.02)):
        left = factory.admission.open, len(_clients() - clients_before)
        if left == (0, 0):
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    return left


@pytest.mark.parametrize("kind", ["unix", "tcp", "tls"])
@pytest_twisted.ensureDeferred
async def test_ended_websockets_leave_no_connection(fleet, kind):
    """After refused upgrades (403, 404), consoles the client closes and consoles the
    server closes, neither the server nor the client holds a connection."""
    factory, listeners, endpoint = _server(kind, fleet)
    before = _clients()
    try:
        handlers = []
        for i in range(N):
            for target, status in (("/ws/secret", 403), ("/nowhere", 404)):
                with pytest.raises(HTTPRefusal) as refused:
                    await connect(endpoint, "h", target, Console(), 65536, 5, reactor)
                assert refused.value.status == status
            handler = Console()
            socket = await connect(endpoint, "h", f"/ws/c{i}", handler, 65536, 5, reactor)
            socket.close()
            handlers.append(handler)
            handler = Console()
            await connect(endpoint, "h", f"/bye/s{i}", handler, 65536, 5, reactor)
            handlers.append(handler)
        assert await _settled(factory, before) == (0, 0)
        # Every console heard of its end once; the server's own close came with its
        # code (the answer to the client's may be read or not before the close).
        assert all(len(h.codes) == 1 for h in handlers)
        assert [h.codes for h in handlers[1::2]] == [[1000]] * N
    finally:
        await listeners.stopService()


@pytest_twisted.ensureDeferred
async def test_tls_peer_that_never_finishes_the_close_is_cut_off(fleet):
    """A TLS peer that sends a WebSocket close and then neither answers TLS's close
    alert nor closes is cut off CLOSE_TIMEOUT after the server's close, not kept."""
    clock = task.Clock()
    factory, listeners, _ = _server("tls", fleet, clock)
    port = int(listeners.bound[0].rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=fleet["ca"])
    context.check_hostname = False
    context.load_cert_chain(*fleet["client/ops"])
    raw = stdlib_socket.create_connection(("127.0.0.1", port), timeout=5)
    peer = context.wrap_socket(raw, do_handshake_on_connect=False)

    def upgrade_then_close():
        peer.sendall(
            b"GET /ws/x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += peer.recv(4096)
        # A masked close frame (code 1000), and nothing more, ever.
        mask = b"abcd"
        payload = struct.pack("!H", 1000)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        peer.sendall(b"\x88\x82" + mask + masked)
        return answer

    try:
        answer = await threads.deferToThread(peer.do_handshake)
        answer = await threads.deferToThread(upgrade_then_close)
        assert answer.startswith(b"HTTP/1.1 101")
        # Conditions waited for up to 5 s each (they take a few turns; 1 s was little
        # on a loaded machine, and advancing the clock before the timer is set
        # would leave the connection open).
        for _ in range(250):
            if any(c.active() for c in clock.getDelayedCalls()):
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        assert any(c.active() for c in clock.getDelayedCalls()), "no close timer"
        assert factory.admission.open == 1  # closed, waiting for the peer
        clock.advance(CLOSE_TIMEOUT)
        for _ in range(250):
            if factory.admission.open == 0:
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        assert factory.admission.open == 0
    finally:
        peer.close()
        await listeners.stopService()
