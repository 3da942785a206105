"""
send_now: answers go out at once when nothing is queued, and bytes never overtake
bytes; over real TCP and Unix connections.
"""

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor

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


async def exchange(server_endpoint, client_endpoint, script):
    """Run ``script(transport)`` on the server side of one connection; return what the
    client received and what ``script`` returned."""
    seen = defer.Deferred()

    class Server(protocol.Protocol):
        def connectionMade(self):
            result = script(self.transport)
            self.transport.loseConnection()
            seen.callback(result)

    port = await server_endpoint.listen(protocol.Factory.forProtocol(Server))
    try:
        sink = Sink()
        await client_endpoint(port).connect(protocol.Factory.forProtocol(lambda: sink))
        result = await seen
        return await sink.done, result
    finally:
        await port.stopListening()


@pytest.fixture(params=["tcp", "unix"])
def endpoints_pair(request, short_tmp):
    """(server endpoint, client endpoint for a listening port) over TCP or Unix."""
    if request.param == "tcp":
        return (
            endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            lambda port: endpoints.TCP4ClientEndpoint(
                reactor, "127.0.0.1", port.getHost().port
            ),
        )
    path = f"{short_tmp}/s.sock"
    return (
        endpoints.UNIXServerEndpoint(reactor, path),
        lambda port: endpoints.UNIXClientEndpoint(reactor, path),
    )


@pytest_twisted.ensureDeferred
async def test_small_answer_leaves_nothing_buffered(endpoints_pair):
    """An answer the socket takes whole is sent during the call: the transport's
    buffer stays empty (no trip through the reactor)."""

    def script(transport):
        send_now(transport, b"hello")
        return (transport.dataBuffer, transport._tempDataLen)

    received, buffered = await exchange(*endpoints_pair, script)
    assert received == b"hello"
    assert buffered == (b"", 0)


@pytest_twisted.ensureDeferred
async def test_bytes_never_overtake_queued_bytes(endpoints_pair):
    """With bytes already queued in the transport, send_now queues behind them."""

    def script(transport):
        transport.write(b"first,")
        send_now(transport, b"second")
        return transport._tempDataLen

    received, queued = await exchange(*endpoints_pair, script)
    assert received == b"first,second"
    assert queued == len(b"first,second")


@pytest_twisted.ensureDeferred
async def test_more_than_the_socket_takes_is_buffered_in_order(endpoints_pair):
    """A body larger than the socket's buffer: what the kernel took went out, the rest
    is queued by the transport, and everything arrives in order."""
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB

    def script(transport):
        send_now(transport, body)
        send_now(transport, b"tail")
        return transport._tempDataLen + len(transport.dataBuffer)

    received, queued = await exchange(*endpoints_pair, script)
    assert 0 < queued < len(body) + 4
    assert received == body + b"tail"


def test_other_transports_get_write():
    """A transport that is not Twisted's TCP or Unix one (TLS, a test's) is written to
    as always."""
    from twisted.internet.testing import StringTransport

    transport = StringTransport()
    send_now(transport, b"x")
    assert transport.value() == b"x"
