"""
Mutual TLS over real loopback sockets in the reactor: identities, refusals inside the
handshake, reload, and the enrollment chain check.
"""

import socket

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from zope.interface import implementer
from zope.interface.verify import verifyObject

from hero_compute import pki
from hero_compute.rpc import tls, tls_enroll

TD = "hero-compute"
WAIT = 10


def material(fleet, who):
    """The TLS material of ``who`` (``None``: no certificate) in the fleet."""
    if who is None:
        return tls.TLSMaterial(None, None, fleet["ca"])
    cert, key = fleet[who]
    return tls.TLSMaterial(cert, key, fleet["ca"])


@implementer(IHandshakeListener)
class Echo(protocol.Protocol):
    """Echoes; records the bytes it got and the client's identity after the handshake."""

    def connectionMade(self):
        self.received = b""
        self.identity = "no handshake"
        self.lost = defer.Deferred()
        self.factory.connections.append(self)

    def handshakeCompleted(self):
        self.identity = tls.peer_identity(self.transport, TD)

    def dataReceived(self, data):
        self.received += data
        self.transport.write(data)

    def connectionLost(self, reason=protocol.connectionDone):
        self.lost.callback(None)


class Client(protocol.Protocol):
    """Sends ``hello`` at once; fires ``echoed`` when it comes back, ``lost`` at the end."""

    def __init__(self):
        self.got = b""
        self.echoed = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b"hello")

    def dataReceived(self, data):
        self.got += data
        if self.got == b"hello" and not self.echoed.called:
            self.echoed.callback(self.got)

    def connectionLost(self, reason=protocol.connectionDone):
        self.reason = reason
        self.lost.callback(None)


@pytest.fixture
def serve():
    """Listen with TLS on 127.0.0.1:0: ``serve(creator) -> (port number, factory)``."""
    ports = []

    def start(creator):
        factory = protocol.Factory.forProtocol(Echo)
        factory.connections = []
        port = reactor.listenTCP(
            0, tls.tls_server_factory(creator, factory), interface="127.0.0.1"
        )
        ports.append(port)
        return port.getHost().port, factory

    yield start
    for port in ports:
        port.stopListening()


async def connect(port, creator):
    """A connected :class:`Client` over TLS made by ``creator``."""
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    return await endpoint.connect(protocol.Factory.forProtocol(Client))


def within(d):
    """``d`` bounded by the test's wait."""
    return d.addTimeout(WAIT, reactor)


async def refused(client, factory):
    """Wait until both sides of a refused handshake closed; return the client's reason."""
    await within(client.lost)
    for server in factory.connections:
        await within(server.lost)
    return client.reason


def test_creators_provide_their_interfaces(fleet):
    """ServerTLS and ClientTLS provide Twisted's OpenSSL connection-creator interfaces."""
    assert verifyObject(
        IOpenSSLServerConnectionCreator, tls.ServerTLS(material(fleet, "explorer/e1"))
    )
    assert verifyObject(
        IOpenSSLClientConnectionCreator,
        tls.ClientTLS(material(fleet, None), tls.Expected("explorer")),
    )


@pytest_twisted.ensureDeferred
async def test_client_certificate_identifies_the_caller(fleet, serve):
    """A client with a fleet certificate is known to the server by role and name."""
    port, factory = serve(tls.ServerTLS(material(fleet, "node/a")))
    client = await connect(
        port, tls.ClientTLS(material(fleet, "client/c"), tls.Expected("node", "a"))
    )
    assert await within(client.echoed) == b"hello"
    assert factory.connections[0].identity == tls.PeerIdentity(TD, "client", "c")
    assert tls.peer_identity(client.transport, TD) == tls.PeerIdentity(TD, "node", "a")
    client.transport.loseConnection()
    await within(client.lost)


@pytest_twisted.ensureDeferred
async def test_client_without_certificate_has_no_identity(fleet, serve):
    """A client with no certificate gets through the handshake, with identity None."""
    port, factory = serve(tls.ServerTLS(material(fleet, "explorer/e1")))
    client = await connect(
        port, tls.ClientTLS(material(fleet, None), tls.Expected("explorer"))
    )
    assert await within(client.echoed) == b"hello"
    assert factory.connections[0].identity is None
    client.transport.loseConnection()
    await within(client.lost)


@pytest_twisted.ensureDeferred
async def test_certificate_of_another_ca_fails_the_handshake(fleet, serve):
    """A client certificate from another CA is refused in the handshake; nothing is read."""
    port, factory = serve(tls.ServerTLS(material(fleet, "explorer/e1")))
    cert, key = fleet["other/node/a"]
    foreign = _Presenting(pki.load_certificate(cert), pki.load_private_key(key))
    client = await connect(port, foreign)
    reason = await refused(client, factory)
    assert reason.check(SSL.Error), reason
    assert client.got == b""
    assert [server.received for server in factory.connections] == [b""]
    assert factory.connections[0].identity == "no handshake"


@implementer(IOpenSSLClientConnectionCreator)
class _Presenting:
    """A client TLS side presenting any certificate and verifying nothing."""

    def __init__(self, cert, key):
        self._cert, self._key = cert, key

    def clientConnectionForTLS(self, tlsProtocol):
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.use_certificate(self._cert)
        ctx.use_privatekey(self._key)
        ctx.set_verify(SSL.VERIFY_NONE)
        return SSL.Connection(ctx, None)


@pytest_twisted.ensureDeferred
async def test_expired_client_certificate_fails_the_handshake(fleet, serve):
    """A fleet certificate issued with a clock 100 days back for 90 days is refused."""
    import datetime

    ca = pki.CertificateAuthority.from_directory(fleet["ca_dir"])
    key = pki.make_key()
    then = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=100)
    old = ca.issue("client", "c", key.public_key(), days=90, now=then)
    port, factory = serve(tls.ServerTLS(material(fleet, "explorer/e1")))
    client = await connect(
        port,
        tls.ClientTLS(tls.Credentials(ca.certificate, old, key), tls.Expected("explorer")),
    )
    reason = await refused(client, factory)
    assert reason.check(SSL.Error), reason
    assert [server.received for server in factory.connections] == [b""]


@pytest_twisted.ensureDeferred
async def test_wrong_node_fails_the_handshake_before_any_data(fleet, serve):
    """A client expecting node/a refuses a server holding node/b: no byte reaches it."""
    port, factory = serve(tls.ServerTLS(material(fleet, "node/b")))
    client = await connect(
        port, tls.ClientTLS(material(fleet, "explorer/e1"), tls.Expected("node", "a"))
    )
    reason = await refused(client, factory)
    assert reason.check(SSL.Error), reason
    assert [server.received for server in factory.connections] == [b""]
    assert client.got == b""


@pytest_twisted.ensureDeferred
async def test_role_expectation_refuses_other_roles(fleet, serve):
    """A node expecting any explorer refuses a server that is a node."""
    port, factory = serve(tls.ServerTLS(material(fleet, "node/b")))
    client = await connect(
        port, tls.ClientTLS(material(fleet, "node/a"), tls.Expected("explorer"))
    )
    reason = await refused(client, factory)
    assert reason.check(SSL.Error), reason
    assert [server.received for server in factory.connections] == [b""]


@pytest_twisted.ensureDeferred
async def test_server_of_another_ca_fails_the_handshake(fleet, serve):
    """A server whose certificate is of another CA is refused even if it names node/a."""
    cert, key = fleet["other/node/a"]
    port, factory = serve(tls.ServerTLS(tls.TLSMaterial(cert, key, fleet["other-ca"])))
    client = await connect(
        port, tls.ClientTLS(material(fleet, "explorer/e1"), tls.Expected("node", "a"))
    )
    reason = await refused(client, factory)
    assert reason.check(SSL.Error), reason
    assert [server.received for server in factory.connections] == [b""]


@pytest_twisted.ensureDeferred
async def test_reload_swaps_the_certificate_for_new_connections(fleet, serve):
    """After reload, new connections see the new certificate and open ones go on."""
    prefix = str(fleet["dir"] / "served")
    pki.create_cert(fleet["ca_dir"], "node", "a", out=prefix)
    server = tls.ServerTLS(
        tls.TLSMaterial(f"{prefix}.pem", f"{prefix}-key.pem", fleet["ca"])
    )
    port, factory = serve(server)
    old = await connect(
        port, tls.ClientTLS(material(fleet, "client/c"), tls.Expected("node", "a"))
    )
    await within(old.echoed)

    pki.create_cert(fleet["ca_dir"], "node", "b", out=prefix, force=True)
    server.reload()
    new = await connect(
        port, tls.ClientTLS(material(fleet, "client/c"), tls.Expected("node", "b"))
    )
    assert await within(new.echoed) == b"hello"
    stale = await connect(
        port, tls.ClientTLS(material(fleet, "client/c"), tls.Expected("node", "a"))
    )
    await within(stale.lost)
    assert stale.reason.check(SSL.Error)

    old.echoed = defer.Deferred()
    old.got = b""
    old.transport.write(b"hello")
    assert await within(old.echoed) == b"hello"
    for client in (old, new):
        client.transport.loseConnection()
        await within(client.lost)


def test_failed_reload_keeps_the_old_context(fleet):
    """A reload from a broken key file raises a clear error and keeps the old material."""
    prefix = str(fleet["dir"] / "served")
    pki.create_cert(fleet["ca_dir"], "node", "a", out=prefix)
    server = tls.ServerTLS(
        tls.TLSMaterial(f"{prefix}.pem", f"{prefix}-key.pem", fleet["ca"])
    )
    before = server.credentials
    with open(f"{prefix}-key.pem", "wb") as f:
        f.write(b"garbage")
    with pytest.raises(tls.TLSConfigError, match="served-key.pem"):
        server.reload()
    assert server.credentials is before


def test_mismatched_key_is_refused(fleet):
    """Material whose key is not the certificate's is refused, naming the problem."""
    cert, _ = fleet["node/a"]
    _, key = fleet["node/b"]
    with pytest.raises(tls.TLSConfigError, match="does not belong"):
        tls.ServerTLS(tls.TLSMaterial(cert, key, fleet["ca"]))


def test_certificate_of_another_ca_is_refused_as_material(fleet):
    """Our own certificate must be issued by the CA we are given."""
    cert, key = fleet["other/node/a"]
    with pytest.raises(tls.TLSConfigError, match="not issued by the CA"):
        tls.ServerTLS(tls.TLSMaterial(cert, key, fleet["ca"]))


@pytest_twisted.ensureDeferred
async def test_fetch_peer_chain_and_pin(fleet, serve):
    """The explorer's chain is read without sending data; the right pin yields the CA
    and a wrong pin is refused, saying so."""
    port, factory = serve(tls.ServerTLS(material(fleet, "explorer/e1")))
    chain = await tls_enroll.fetch_peer_chain(reactor, "127.0.0.1", port, WAIT)
    ca = pki.load_certificate(fleet["ca"])
    assert chain[-1] == ca
    assert tls_enroll.ca_from_chain(chain, fleet["pin"]) == ca
    assert tls_enroll.ca_from_chain(chain, fleet["pin"].upper()) == ca
    wrong = "sha256:" + "0" * 64
    with pytest.raises(tls_enroll.ChainError, match="pin"):
        tls_enroll.ca_from_chain(chain, wrong)
    for server in factory.connections:
        await within(server.lost)
    assert [server.received for server in factory.connections] == [b""]


@pytest_twisted.ensureDeferred
async def test_ca_from_chain_wants_an_explorer(fleet, serve):
    """A chain of the pinned CA whose leaf is a node, not an explorer, is refused."""
    port, factory = serve(tls.ServerTLS(material(fleet, "node/a")))
    chain = await tls_enroll.fetch_peer_chain(reactor, "127.0.0.1", port, WAIT)
    with pytest.raises(tls_enroll.ChainError, match="not an explorer"):
        tls_enroll.ca_from_chain(chain, fleet["pin"])
    for server in factory.connections:
        await within(server.lost)


def test_ca_from_chain_wants_the_leaf_issued_by_the_pinned_ca(fleet):
    """A leaf of another CA next to the pinned CA certificate is refused."""
    other_leaf = pki.load_certificate(fleet["other/node/a"][0])
    ca = pki.load_certificate(fleet["ca"])
    with pytest.raises(tls_enroll.ChainError, match="not issued by the pinned CA"):
        tls_enroll.ca_from_chain([other_leaf, ca], fleet["pin"])


@pytest_twisted.ensureDeferred
async def test_fetch_peer_chain_fails_when_nothing_listens():
    """Fetching from a port nobody listens on fails instead of hanging."""
    probe = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    port = probe.getHost().port
    await probe.stopListening()
    with pytest.raises(error.ConnectError):
        await tls_enroll.fetch_peer_chain(reactor, "127.0.0.1", port, WAIT)


@pytest_twisted.ensureDeferred
async def test_fetch_peer_chain_times_out_on_a_silent_server():
    """A server that accepts but never speaks TLS makes the fetch time out."""
    silent = reactor.listenTCP(
        0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1"
    )
    try:
        with pytest.raises(defer.TimeoutError):
            await tls_enroll.fetch_peer_chain(
                reactor, "127.0.0.1", silent.getHost().port, 0.3
            )
    finally:
        await silent.stopListening()


def test_identity_of_checks_the_trust_domain(fleet):
    """A certificate's identity is read in its trust domain and refused in another."""
    cert = pki.load_certificate(fleet["node/a"][0])
    assert tls.identity_of(cert, TD) == tls.PeerIdentity(TD, "node", "a")
    assert tls.identity_of(cert, "other-fleet") is None


def test_identity_of_refuses_certificates_without_one_spiffe_uri(tmp_path):
    """No URI SAN, two URI SANs, or a malformed one: no identity."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    ca_dir = str(tmp_path / "ca")
    pki.create_ca(ca_dir)
    ca = pki.CertificateAuthority.from_directory(ca_dir)
    key = pki.make_key()
    now = datetime.datetime.now(datetime.UTC)

    def cert(uris):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca.certificate.subject)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(1))
        )
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(u) for u in uris]
                ),
                critical=True,
            )
        return builder.sign(ca.key, hashes.SHA256())

    assert tls.identity_of(cert([]), TD) is None
    assert (
        tls.identity_of(cert([f"spiffe://{TD}/node/a", f"spiffe://{TD}/node/b"]), TD)
        is None
    )
    for uri in (
        f"spiffe://{TD}/node",
        f"spiffe://{TD}/admin/x",
        f"spiffe://{TD}:1/node/a",
        f"spiffe://{TD}/node/a/b",
        f"spiffe://{TD}/node/a?x",
        f"https://{TD}/node/a",
    ):
        assert tls.identity_of(cert([uri]), TD) is None, uri
    assert tls.identity_of(cert([f"spiffe://{TD}/node/a"]), TD) == tls.PeerIdentity(
        TD, "node", "a"
    )


def test_expected_matches_identity_or_role():
    """Expected(role, name) wants that identity; Expected(role) any name of the role."""
    a = tls.PeerIdentity(TD, "node", "a")
    assert tls.Expected("node", "a").allows(a)
    assert not tls.Expected("node", "b").allows(a)
    assert tls.Expected("node").allows(a)
    assert not tls.Expected("explorer").allows(a)
    assert not tls.Expected("node").allows(None)


def test_contexts_release_idle_record_buffers(fleet):
    """Server and client contexts free OpenSSL's record buffers between records (an
    explorer holds an idle connection per node)."""
    for creator in (
        tls.ServerTLS(material(fleet, "explorer/e1")),
        tls.ClientTLS(material(fleet, "node/a"), tls.Expected("explorer")),
    ):
        # set_mode adds to the mode and returns it: adding nothing reads it.
        assert creator._context.set_mode(0) & SSL.MODE_RELEASE_BUFFERS


@pytest.mark.parametrize("version", ["TLSv1_3", "TLSv1_2"])
@pytest_twisted.ensureDeferred
async def test_server_resumes_no_session(fleet, serve, version):
    """A client offering its previous session gets a full handshake: its certificate
    is verified again (and the server sealed no session into a ticket)."""
    import ssl

    from twisted.internet import threads

    port, factory = serve(tls.ServerTLS(material(fleet, "explorer/e1")))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(fleet["ca"])
    context.load_cert_chain(*fleet["client/c"])
    context.check_hostname = False
    context.maximum_version = getattr(ssl.TLSVersion, version)

    def call(session=None):
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
            with context.wrap_socket(raw, session=session) as conn:
                conn.sendall(b"hello")
                assert conn.recv(5) == b"hello"  # TLS 1.3 tickets arrive before it
                return conn.session, conn.session_reused, conn.version()

    session, _, got = await threads.deferToThread(call)
    assert got == version.replace("_", ".")
    assert session is not None
    _, reused, _ = await threads.deferToThread(call, session)
    assert not reused
    for server in factory.connections:
        await within(server.lost)
    assert [server.identity for server in factory.connections] == [
        tls.PeerIdentity(TD, "client", "c")
    ] * 2
