"""
The TLS transport of our listeners (:mod:`hero_compute.rpc.tls_server`, the standard
library's ssl) over real loopback sockets: what TLS it speaks and refuses, and how a
connection ends (close_notify, truncation, abort), waits and pushes back.
"""

import ctypes
import socket
import ssl
import struct
import time

import pytest
import pytest_twisted
from twisted.internet import defer, error, protocol, reactor, task, threads
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from hero_compute.rpc import tls, tls_context

from .support import bio_handshake, until

TD = "hero-compute"
WAIT = 10


def material(fleet, who):
    """The TLS material of ``who`` in the fleet."""
    cert, key = fleet[who]
    return tls.TLSMaterial(cert, key, fleet["ca"])


@implementer(IHandshakeListener)
class Server(protocol.Protocol):
    """Runs the factory's ``on_handshake(self)``; records what it got and why it ended."""

    def connectionMade(self):
        self.got = b""
        self.lost = defer.Deferred()
        self.factory.connections.append(self)
        on_made = getattr(self.factory, "on_made", None)
        if on_made is not None:
            on_made(self)

    def handshakeCompleted(self):
        on_handshake = getattr(self.factory, "on_handshake", None)
        if on_handshake is not None:
            on_handshake(self)

    def dataReceived(self, data):
        self.got += data

    def connectionLost(self, reason=protocol.connectionDone):
        self.reason = reason
        self.lost.callback(None)


@pytest.fixture
def serve(fleet):
    """Listen with our TLS on 127.0.0.1:0: ``serve(**hooks) -> (port, factory)``."""
    ports = []

    def start(**hooks):
        factory = protocol.Factory.forProtocol(Server)
        factory.connections = []
        for name, hook in hooks.items():
            setattr(factory, name, hook)
        creator = tls.ServerTLS(material(fleet, "explorer/e1"))
        port = reactor.listenTCP(
            0, tls.tls_server_factory(creator, factory), interface="127.0.0.1"
        )
        ports.append(port)
        return port.getHost().port, factory

    yield start
    for port in ports:
        port.stopListening()


def client_context(fleet, who="client/c"):
    """A stdlib client context of the fleet, with ``who``'s certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(fleet["ca"])
    context.load_cert_chain(*fleet[who])
    context.check_hostname = False
    return context


def connect(port, context):
    """A blocking TLS connection to our listener (raw EOFs raise, not return b"")."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return context.wrap_socket(raw, suppress_ragged_eofs=False)


def within(d):
    return d.addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_tls_1_1_is_refused_by_the_server(fleet, serve):
    """A client that offers only TLS 1.1 is refused with a protocol_version alert,
    and the server's protocol hears of the failure."""
    port, factory = serve()
    context = client_context(fleet)
    with pytest.warns(DeprecationWarning):
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")

    def call():
        with pytest.raises(ssl.SSLError) as caught:
            connect(port, context)
        return str(caught.value)

    why = await threads.deferToThread(call)
    assert "PROTOCOL_VERSION" in why.upper()
    for server in factory.connections:
        await within(server.lost)
        assert server.got == b""


@pytest_twisted.ensureDeferred
async def test_tls_1_2_without_forward_secrecy_or_aead_is_refused(fleet, serve):
    """Over TLS 1.2 a client offering only a CBC suite gets no shared cipher."""
    port, factory = serve()
    context = client_context(fleet)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES128-SHA")

    def call():
        with pytest.raises(ssl.SSLError) as caught:
            connect(port, context)
        return str(caught.value)

    why = await threads.deferToThread(call)
    assert "HANDSHAKE_FAILURE" in why.upper() or "NO_SHARED_CIPHER" in why.upper()


@pytest_twisted.ensureDeferred
async def test_client_of_another_ca_is_refused_and_heard_nothing(fleet, serve):
    """A certificate of another CA fails the handshake; the protocol got no byte."""
    port, factory = serve()
    context = client_context(fleet, "stranger")

    def call():
        conn = connect(port, context)
        # TLS 1.3: the client learns of the refusal at its first read.
        with pytest.raises((ssl.SSLError, OSError)):
            conn.sendall(b"hello")
            conn.recv(10)
        conn.close()

    await threads.deferToThread(call)
    for server in factory.connections:
        await within(server.lost)
        assert server.got == b""
        assert server.transport.getPeerCertificate() is None


@pytest_twisted.ensureDeferred
async def test_writes_before_the_handshake_wait_for_it(fleet, serve):
    """What the protocol writes as it connects (before any handshake) arrives once
    the handshake is done, in order."""
    port, _ = serve(
        on_made=lambda s: (s.transport.write(b"early,"), s.transport.write(b"x"))
    )

    def call():
        with connect(port, client_context(fleet)) as conn:
            got = b""
            while len(got) < 7:
                got += conn.recv(10)
            return got

    assert await threads.deferToThread(call) == b"early,x"


@pytest_twisted.ensureDeferred
async def test_lose_connection_ends_with_close_notify(fleet, serve):
    """loseConnection sends what was written then close_notify (a clean end for the
    client), and closes once the client answers it."""
    port, factory = serve(
        on_handshake=lambda s: (s.transport.write(b"bye"), s.transport.loseConnection())
    )

    def call():
        conn = connect(port, client_context(fleet))
        conn.sendall(b"hi")
        got = b""
        while True:
            data = conn.recv(10)  # b"" only for close_notify: truncation would raise
            if not data:
                break
            got += data
        conn.unwrap().close()
        return got

    assert await threads.deferToThread(call) == b"bye"
    (server,) = factory.connections
    await within(server.lost)
    assert server.reason.check(error.ConnectionDone)


@pytest_twisted.ensureDeferred
async def test_client_close_notify_and_truncation(fleet, serve):
    """A client's close_notify ends the connection cleanly (ConnectionDone); a TCP
    close without it is a truncation (ConnectionLost), after the bytes before it."""
    port, factory = serve()

    def call(clean):
        conn = connect(port, client_context(fleet))
        conn.sendall(b"data")
        if clean:
            conn.unwrap().close()
        else:
            conn.close()

    await threads.deferToThread(call, True)
    await threads.deferToThread(call, False)
    clean, cut = factory.connections
    for server in (clean, cut):
        await within(server.lost)
        assert server.got == b"data"
    assert clean.reason.check(error.ConnectionDone)
    assert cut.reason.check(error.ConnectionLost)
    assert not cut.reason.check(error.ConnectionDone)


@pytest_twisted.ensureDeferred
async def test_abort_sends_nothing_more(fleet, serve):
    """abortConnection drops the connection at once: no close_notify, nothing written
    after it."""

    def abort(server):
        server.transport.abortConnection()
        server.transport.write(b"after")

    port, factory = serve(on_handshake=abort)

    def call():
        conn = connect(port, client_context(fleet))
        try:
            conn.sendall(b"hi")
            return conn.recv(10)
        except (ssl.SSLError, OSError) as e:
            return e
        finally:
            conn.close()

    got = await threads.deferToThread(call)
    assert isinstance(got, (ssl.SSLEOFError, ConnectionResetError, ssl.SSLError, OSError))
    (server,) = factory.connections
    await within(server.lost)


@implementer(IPushProducer)
class Producer:
    """A streaming producer that counts its pauses and resumes."""

    def __init__(self):
        self.paused = self.resumed = 0
        self.resumed_d = defer.Deferred()

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        self.resumed += 1
        if not self.resumed_d.called:
            self.resumed_d.callback(None)

    def stopProducing(self):
        pass


@pytest_twisted.ensureDeferred
async def test_a_peer_that_does_not_read_pauses_the_producer(fleet, serve):
    """Written past the TCP transport's buffer to a peer that does not read, the
    protocol's producer is paused; resumed once the peer has read it all."""
    producer = Producer()
    body = b"x" * (8 * 2**20)

    def write(server):
        server.transport.registerProducer(producer, True)
        server.transport.write(body)

    port, factory = serve(on_handshake=write)
    conn = await threads.deferToThread(connect, port, client_context(fleet))
    await threads.deferToThread(conn.sendall, b"go")
    for _ in range(100):
        if producer.paused:
            break
        await threads.deferToThread(lambda: __import__("time").sleep(0.05))
    assert producer.paused and not producer.resumed

    def drain():
        got = 0
        while got < len(body):
            got += len(conn.recv(2**16))
        return got

    assert await threads.deferToThread(drain) == len(body)
    await within(producer.resumed_d)
    conn.close()


def test_the_context_speaks_as_the_pyopenssl_one(fleet):
    """The stdlib context: TLS 1.2 at least, the client certificate optional but
    verified, no session cache, record buffers released between records."""
    context = tls.ServerTLS(material(fleet, "explorer/e1")).ssl_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_OPTIONAL
    assert context.options & ssl.OP_NO_TICKET and context.options & ssl.OP_NO_RENEGOTIATION
    lib = tls_context._LibSSL.get()
    handle = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    assert lib.SSL_CTX_ctrl(handle, 45, 0, None) == 0  # SSL_SESS_CACHE_OFF
    release_buffers = 0x10
    assert lib.SSL_CTX_ctrl(handle, 33, 0, None) & release_buffers  # SSL_CTRL_MODE
    suites = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert suites and all(s.startswith("ECDHE-") for s in suites)
    assert all("GCM" in s or "CHACHA20" in s for s in suites)


@pytest_twisted.ensureDeferred
async def test_the_certificate_request_names_the_fleet_ca(fleet, serve):
    """The server asks for a client certificate of the fleet CA, by name (a browser
    offers only those)."""
    from cryptography import x509
    from OpenSSL import SSL

    port, _ = serve()
    ca = x509.load_pem_x509_certificate(open(fleet["ca"], "rb").read())

    def call():
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_verify(SSL.VERIFY_NONE)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
            # pyOpenSSL reads the descriptor itself: blocking, bounded by SO_RCVTIMEO.
            raw.setblocking(True)
            raw.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", WAIT, 0)
            )
            conn = SSL.Connection(context, raw)
            conn.set_connect_state()
            conn.do_handshake()
            names = conn.get_client_ca_list()
            conn.close()
            return [name.der() for name in names]

    assert await threads.deferToThread(call) == [ca.subject.public_bytes()]


@pytest_twisted.ensureDeferred
async def test_the_handshake_deadline_ends_with_the_handshake(fleet):
    """Admitted TLS: a handshake done in time stops the deadline (the connection
    outlives it and is served); one never begun is cut off at it."""
    from hero_compute.rpc.admission import Admission, AdmittedTLSFactory
    from hero_compute.rpc.limits import Limits

    factory = protocol.Factory.forProtocol(Server)
    factory.connections = []
    shaken = []
    factory.on_handshake = shaken.append
    # The deadline on a clock of the test's: it passes when the test says, after the
    # handshake (made in a thread, against the real reactor) has ended, however slow.
    clock = task.Clock()
    admission = Admission(Limits(head_timeout=1.0), clock)
    creator = tls.ServerTLS(material(fleet, "explorer/e1"))
    port = reactor.listenTCP(
        0, AdmittedTLSFactory(creator, factory, admission), interface="127.0.0.1"
    )
    try:
        number = port.getHost().port
        conn = await threads.deferToThread(connect, number, client_context(fleet))
        try:
            await until(lambda: shaken, timeout=WAIT, what="the handshake")
            clock.advance(1.5)  # past the deadline: the handshake stopped it
            await threads.deferToThread(conn.sendall, b"late")
            await threads.deferToThread(lambda: conn.unwrap().close())
        finally:
            conn.close()
        served = factory.connections[0]
        await within(served.lost)
        assert served.got == b"late"
        assert served.reason.check(error.ConnectionDone)
        raw = socket.create_connection(("127.0.0.1", number), timeout=WAIT)
        try:
            await until(lambda: len(factory.connections) == 2, what="the second")
            clock.advance(1.5)  # never begun: cut off at the deadline, nothing said

            def heard():
                try:
                    return raw.recv(10)
                except ConnectionResetError:
                    return b""

            assert await threads.deferToThread(heard) == b""
        finally:
            raw.close()
        silent = factory.connections[1]
        await within(silent.lost)
        assert admission.refusals["head_timeout"] == 1
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_full_records_cut_across_tcp_reads_arrive_whole(fleet, serve):
    """Records of 16 kB of plaintext, sent in pieces that end mid-record, reach the
    protocol whole and in order (a read is sized to the ciphertext waiting, less than
    such a record's plaintext once part of it was read)."""
    port, factory = serve()
    payload = bytes(range(256)) * 160  # 40,960 bytes: three records, two of them full

    def send():
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        tls, _, outgoing = bio_handshake(sock, client_context(fleet))
        tls.write(payload)
        wire = outgoing.read()
        for at in range(0, len(wire), 1_000):
            sock.sendall(wire[at : at + 1_000])
            # fixed wait: the attack's pace, so that most pieces are read apart
            time.sleep(0.002)
        return sock

    sock = await threads.deferToThread(send)
    try:
        await until(
            lambda: factory.connections and len(factory.connections[0].got) >= len(payload),
            timeout=WAIT,
            what="the whole payload",
        )
        assert factory.connections[0].got == payload
    finally:
        sock.close()


def test_a_records_rest_behind_a_byte_of_the_next_is_read_at_once(fleet):
    """An attacker who sends each 16 kB record in two pieces, the second carrying one
    byte of the next record, gets each record to the protocol in at most three
    dataReceived calls (it was one byte per call: ~8,000 a record, 6 ms of CPU)."""
    calls = []

    class Counting(protocol.Protocol):
        def dataReceived(self, data):
            calls.append(len(data))

    creator = tls.ServerTLS(material(fleet, "explorer/e1"))
    server = tls.tls_server_factory(
        creator, protocol.Factory.forProtocol(Counting)
    ).buildProtocol(None)
    wire = StringTransport()
    server.makeConnection(wire)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(fleet).wrap_bio(incoming, outgoing)
    for _ in range(10):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            server.dataReceived(outgoing.read())
            incoming.write(wire.value())
            wire.clear()
    records = []
    for _ in range(21):
        client.write(b"x" * 16384)
        records.append(outgoing.read())
    server.dataReceived(records[0][:1])
    for k in range(20):
        half = len(records[k]) // 2
        server.dataReceived(records[k][1:half])
        server.dataReceived(records[k][half:] + records[k + 1][:1])
    # The 20 records, some of the 21st's plaintext perhaps not yet.
    assert 20 * 16384 <= sum(calls) <= 21 * 16384
    assert len(calls) <= 3 * 20, len(calls)
