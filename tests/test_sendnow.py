"""
send_now: answers go out at once when nothing is queued, and bytes never overtake
bytes; over real TCP, Unix and mutual TLS connections.
"""

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor, tcp, unix
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.testing import StringTransport
from twisted.protocols import tls as twisted_tls
from zope.interface import implementer

from hero_compute.rpc import tls, tls_server
from hero_compute.rpc.sendnow import send_now


class Sink(protocol.Protocol):
    """The client side: collects every byte until the server closes."""

    def __init__(self):
        self.data = []
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.data.append(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.data))


def under(transport):
    """The transport that owns the socket: the TCP one under a TLS transport."""
    return getattr(transport, "transport", None) or transport


async def exchange(pair, script):
    """Run ``script(transport)`` on the server side of one connection (over TLS: once
    the handshake is done); return what the client received and what ``script``
    returned."""
    server_endpoint, client_endpoint, wrap = pair
    seen = defer.Deferred()

    @implementer(IHandshakeListener)
    class Server(protocol.Protocol):
        def connectionMade(self):
            if wrap is None:
                self.run()

        def handshakeCompleted(self):
            self.run()

        def run(self):
            result = script(self.transport)
            self.transport.loseConnection()
            seen.callback(result)

    factory = protocol.Factory.forProtocol(Server)
    port = await server_endpoint.listen(factory if wrap is None else wrap(factory))
    try:
        sink = Sink()
        await client_endpoint(port).connect(protocol.Factory.forProtocol(lambda: sink))
        result = await seen
        return await sink.done, result
    finally:
        await port.stopListening()


def material(fleet, who):
    """The :class:`~hero_compute.rpc.tls.TLSMaterial` of ``who`` in the fleet."""
    return tls.TLSMaterial(*fleet[who], fleet["ca"])


def tcp_pair():
    return (
        endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
        lambda port: endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", port.getHost().port
        ),
    )


@pytest.fixture(params=["tcp", "unix", "tls"])
def endpoints_pair(request, short_tmp):
    """(server endpoint, client endpoint for a listening port, server wrapper) over
    TCP, Unix, or mutual TLS as our listeners serve it."""
    if request.param == "tcp":
        return (*tcp_pair(), None)
    if request.param == "tls":
        server, client = tcp_pair()
        fleet = request.getfixturevalue("fleet")
        creator = tls.ServerTLS(material(fleet, "explorer/e1"))
        client_tls = tls.ClientTLS(material(fleet, "client/c"), tls.Expected("explorer"))
        return (
            server,
            lambda port: endpoints.wrapClientTLS(client_tls, client(port)),
            lambda factory: tls.tls_server_factory(creator, factory),
        )
    path = f"{short_tmp}/s.sock"
    return (
        endpoints.UNIXServerEndpoint(reactor, path),
        lambda port: endpoints.UNIXClientEndpoint(reactor, path),
        None,
    )


def pending(transport):
    """What the socket's transport holds unsent: (dataBuffer, _tempDataLen)."""
    socket_transport = under(transport)
    return (socket_transport.dataBuffer, socket_transport._tempDataLen)


@pytest_twisted.ensureDeferred
async def test_small_answer_leaves_nothing_buffered(endpoints_pair):
    """An answer the socket takes whole is sent during the call: the transport's
    buffer stays empty (no trip through the reactor); over TLS, its record too."""

    def script(transport):
        calls = len(reactor.getDelayedCalls())
        send_now(transport, b"hello")
        kind = type(under(transport))
        return pending(transport), len(reactor.getDelayedCalls()) - calls, kind

    received, (buffered, new_calls, kind) = await exchange(endpoints_pair, script)
    assert kind in (tcp.Server, unix.Server)  # whose buffer send_now reads
    assert received == b"hello"
    assert buffered == (b"", 0)
    assert new_calls == 0  # no write held for a later turn (BufferingTLSTransport's)


@pytest_twisted.ensureDeferred
async def test_bytes_never_overtake_queued_bytes(short_tmp):
    """With bytes already queued in the transport, send_now queues behind them."""
    for pair in (
        (*tcp_pair(), None),
        (
            endpoints.UNIXServerEndpoint(reactor, f"{short_tmp}/s.sock"),
            lambda port: endpoints.UNIXClientEndpoint(reactor, f"{short_tmp}/s.sock"),
            None,
        ),
    ):

        def script(transport):
            transport.write(b"first,")
            send_now(transport, b"second")
            return transport._tempDataLen

        received, queued = await exchange(pair, script)
        assert received == b"first,second"
        assert queued == len(b"first,second")


@pytest_twisted.ensureDeferred
async def test_more_than_the_socket_takes_is_buffered_in_order(endpoints_pair):
    """A body larger than the socket's buffer: what the kernel took went out, the rest
    is queued by the transport (over TLS: the TCP one, as ciphertext), and everything
    arrives in order, what came after it included."""
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB

    def script(transport):
        send_now(transport, body)
        send_now(transport, b"tail")
        data, temp = pending(transport)
        return temp + len(data)

    received, queued = await exchange(endpoints_pair, script)
    assert 0 < queued < len(body) * 1.01
    assert received == body + b"tail"


@pytest_twisted.ensureDeferred
async def test_tls_sends_everything_openssl_made(fleet):
    """A write that OpenSSL makes many records of (80 kB) goes out whole and in order,
    what the socket did not take queued as ciphertext in the TCP transport."""
    creator = tls.ServerTLS(material(fleet, "explorer/e1"))
    client_tls = tls.ClientTLS(material(fleet, "client/c"), tls.Expected("explorer"))
    server, client = tcp_pair()
    pair = (
        server,
        lambda port: endpoints.wrapClientTLS(client_tls, client(port)),
        lambda factory: tls.tls_server_factory(creator, factory),
    )
    parts = [bytes([i]) * 16384 for i in range(5)]  # 80 kB: five records in one write

    def script(transport):
        transport.write(b"".join(parts))
        transport.write(b"tail")
        return pending(transport)

    received, _ = await exchange(pair, script)
    assert received == b"".join(parts) + b"tail"


def test_our_tls_transport_sends_through_send_now(fleet, monkeypatch):
    """Our listeners' TLS transport hands its ciphertext to send_now (the tests above
    find a tcp.Server under it), not to a transport that waits for the reactor."""
    factory = tls.tls_server_factory(
        tls.ServerTLS(material(fleet, "explorer/e1")),
        protocol.Factory.forProtocol(protocol.Protocol),
    )
    assert factory.protocol is tls_server.TLSServerProtocol
    assert not issubclass(factory.protocol, twisted_tls.TLSMemoryBIOProtocol)
    sent = []
    monkeypatch.setattr(tls_server, "send_now", lambda t, data: sent.append(data))
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    proto._outgoing.write(b"ciphertext")
    proto._flush()
    assert sent == [b"ciphertext"]


def test_other_transports_get_write():
    """A transport that is not Twisted's TCP or Unix one (a test's, a TLS one) is
    written to as always."""
    transport = StringTransport()
    send_now(transport, b"x")
    assert transport.value() == b"x"
