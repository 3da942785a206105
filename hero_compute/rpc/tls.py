"""
TLS for listeners and clients: mutual authentication against the fleet CA, and the SPIFFE
identity of the peer (contract §6).

Every side presents its certificate with the CA behind it and verifies the other's chain
against the CA with OpenSSL (pyOpenSSL).  A server asks for a client certificate but lets a
client without one in (``VERIFY_PEER`` without ``FAIL_IF_NO_PEER_CERT``): such a caller may
still enroll and discover; what anyone may call is decided above the transport, from
:func:`peer_identity`.  A client checks who the server is *inside* the handshake, in the
verify callback, so a server that is not the one expected ends the handshake before a
single byte of the request is sent.

Long because: both sides' contexts reload from the same material, and the server keeps
pyOpenSSL's context beside the standard library's (:mod:`.tls_server`) for the
interface Twisted's TLS endpoints expect.

Identities are read in :mod:`.tls_peer` (re-exported here).  The explorer's proxy adds a
check of its own to the name's (:attr:`ClientTLS.peer_check`): a node's certificate
that is revoked or superseded fails the handshake too.

Enrollment (a node with a join token and a CA pin but no certificate yet) uses
:func:`fetch_peer_chain` and :func:`ca_from_chain` to learn the CA from the explorer's own
handshake, then talks to the explorer over an ordinary verified connection, so the token
never goes to a server that has not proven it holds a certificate of the pinned CA.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from hero_compute import pki

from .tls_context import server_context
from .tls_peer import Expected as Expected
from .tls_peer import PeerIdentity as PeerIdentity
from .tls_peer import identity_of as identity_of
from .tls_peer import not_before as not_before
from .tls_peer import peer_identity as peer_identity
from .tls_server import TLSServerFactory

log = Logger()

# Forward secrecy and AEAD only, for TLS 1.2 (TLS 1.3 suites are all of that kind).
_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"


#: OpenSSL's verify callback: (connection, certificate, errno, depth, ok) -> ok.
_VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]


class TLSConfigError(Exception):
    """TLS material that cannot be used: unreadable, mismatched, or not of the fleet CA."""


@attrs.frozen
class Credentials:
    """
    Loaded TLS material: the fleet CA, and our certificate and key (both, or neither for
    a client that has none yet).  Checked on creation: the key fits the certificate and
    the certificate is issued by the CA.

    :ivar trust_domain: the CA's trust domain
    """

    ca: x509.Certificate
    certificate: x509.Certificate | None = None
    key: PrivateKeyTypes | None = attrs.field(default=None, repr=False)
    trust_domain: str = attrs.field(init=False)

    @trust_domain.default
    def _trust_domain(self) -> str:
        try:
            return pki.trust_domain_of(self.ca)
        except pki.IdentityError as e:
            raise TLSConfigError(str(e)) from None

    def __attrs_post_init__(self) -> None:
        if (self.certificate is None) != (self.key is None):
            raise TLSConfigError("a certificate needs its key, and a key its certificate")
        if self.certificate is None or self.key is None:
            return
        if pki.spki_pin(self.certificate) != pki.public_key_pin(self.key.public_key()):
            raise TLSConfigError("the private key does not belong to the certificate")
        try:
            self.certificate.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature):
            raise TLSConfigError("the certificate is not issued by the CA") from None

    def load(self) -> Credentials:
        """:return: itself (in-memory credentials are their own source)"""
        return self


@attrs.frozen
class TLSMaterial:
    """
    Where TLS material lives: PEM files, read on each :meth:`load` (so a reload picks up
    renewed files).

    :ivar cert_path: our certificate (``None`` for a client without one)
    :ivar key_path: its private key (``None`` likewise)
    :ivar ca_path: the fleet CA certificate
    """

    cert_path: str | None
    key_path: str | None
    ca_path: str

    def load(self) -> Credentials:
        """
        :return: the credentials the files hold
        :raises TLSConfigError: naming the file and what is wrong with it
        """
        try:
            ca = pki.load_certificate(self.ca_path)
            cert = key = None
            if self.cert_path is not None:
                cert = pki.load_certificate(self.cert_path)
            if self.key_path is not None:
                key = pki.load_private_key(self.key_path)
            return Credentials(ca, cert, key)
        except pki.PkiError as e:
            raise TLSConfigError(str(e)) from None
        except TLSConfigError as e:
            raise TLSConfigError(
                f"{self.cert_path}, {self.key_path}, {self.ca_path}: {e}"
            ) from None


def _context(
    credentials: Credentials, verify: _VerifyCallback, server: bool = False
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION)
    ctx.set_cipher_list(_CIPHERS)
    # A connection keeps OpenSSL's 17 kB read and write buffers only while a record is
    # in flight: an explorer holds one idle connection per node, most of the time.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    # Needed by a server that verifies clients, or a resumed session fails the handshake.
    ctx.set_session_id(b"hero_compute")
    if server:
        # No session resumption: none of our clients resumes (each connection lives
        # long, and verifies its peer in full), while a TLS 1.3 server would otherwise
        # seal two tickets of the session, client certificate and all, after each
        # handshake (a sixth of its CPU), and keep TLS 1.2 sessions in its cache.
        # (OpenSSL still sends two small TLS 1.3 tickets that name no cached session.)
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    store = ctx.get_cert_store()
    assert store is not None  # a new context always has one
    store.add_cert(crypto.X509.from_cryptography(credentials.ca))
    ctx.add_client_ca(credentials.ca)  # tells clients which certificate to send
    if credentials.certificate is not None and credentials.key is not None:
        ctx.use_certificate(credentials.certificate)
        # pyOpenSSL raises TypeError for the kinds of key it cannot use (X25519, ...).
        ctx.use_privatekey(credentials.key)  # type: ignore[arg-type]
        ctx.check_privatekey()
        # The CA goes with the leaf: an enrolling node learns it from the chain.
        ctx.add_extra_chain_cert(credentials.ca)
    ctx.set_verify(SSL.VERIFY_PEER, verify)
    return ctx


class _Reloadable:
    """A connection creator whose context is rebuilt from its material on reload."""

    _context: SSL.Context
    #: The :class:`Credentials` in use.
    credentials: Credentials
    #: Whether the context is a server's.
    _server = False

    def __init__(self, material: TLSMaterial | Credentials) -> None:
        self._material = material
        self.reload()

    @property
    def trust_domain(self) -> str:
        """The trust domain of the CA in use."""
        return self.credentials.trust_domain

    def reload(self) -> None:
        """
        Read the material again and use it for new connections; open connections go on
        with what they had.

        :raises TLSConfigError: if the material is unusable; the previous context (if
            any) stays in use
        """
        try:
            credentials = self._material.load()
            self._check(credentials)
            context = _context(
                credentials, functools.partial(self._verify, credentials), self._server
            )
        except SSL.Error as e:
            raise TLSConfigError(f"OpenSSL refused the TLS material: {e}") from None
        self._context, self.credentials = context, credentials

    def _check(self, credentials: Credentials) -> None:
        pass

    def _verify(
        self,
        credentials: Credentials,
        connection: SSL.Connection,
        cert: crypto.X509,
        errno: int,
        depth: int,
        ok: int,
    ) -> bool:
        raise NotImplementedError


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS(_Reloadable):
    """
    The TLS side of a listener: presents our certificate and the CA, asks every client
    for a certificate and verifies one if offered; clients without one are let in.

    :param material: a :class:`TLSMaterial` (or :class:`Credentials`) with a certificate
    :raises TLSConfigError: if the material is unusable
    """

    _server = True
    _ssl_context: ssl.SSLContext

    def reload(self) -> None:
        """
        Read the material again and use it for new connections (both contexts: the
        standard library's for our listeners, see :mod:`.tls_server`, and pyOpenSSL's
        for :meth:`serverConnectionForTLS`); open connections go on with what they had.

        :raises TLSConfigError: if the material is unusable; the previous contexts (if
            any) stay in use
        """
        previous = getattr(self, "_context", None), getattr(self, "credentials", None)
        _Reloadable.reload(self)
        try:
            self._ssl_context = server_context(self.credentials)
        except (ssl.SSLError, OSError) as e:
            if previous[0] is not None:
                self._context, self.credentials = previous  # type: ignore[assignment]
            raise TLSConfigError(f"OpenSSL refused the TLS material: {e}") from None

    def ssl_context(self) -> ssl.SSLContext:
        """:return: the standard library's context for a new connection"""
        return self._ssl_context

    def _check(self, credentials: Credentials) -> None:
        if credentials.certificate is None:
            raise TLSConfigError("a TLS listener needs a certificate and its key")

    def _verify(
        self,
        credentials: Credentials,
        connection: SSL.Connection,
        cert: crypto.X509,
        errno: int,
        depth: int,
        ok: int,
    ) -> bool:
        return bool(ok)

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """:return: a new :class:`OpenSSL.SSL.Connection` with the current context"""
        return SSL.Connection(self._context, None)


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS(_Reloadable):
    """
    The TLS side of an outgoing connection: presents our certificate (if we have one),
    verifies the server's chain against the CA, and fails the handshake unless the
    server's certificate names the ``expected`` peer.

    :param material: a :class:`TLSMaterial` or :class:`Credentials`
    :param expected: an :class:`Expected` peer; None refuses every peer until a creator
        of :meth:`expecting` says whom
    :raises TLSConfigError: if the material is unusable
    """

    #: ``peer_check(identity, serial, not_before) -> reason or None``: a further check
    #: of a peer whose certificate names the expected identity (the explorer's proxy
    #: refuses a node's revoked or superseded certificate); None accepts it.
    peer_check: Callable[[PeerIdentity, int, float], str | None] | None = None

    def __init__(
        self, material: TLSMaterial | Credentials, expected: Expected | None = None
    ) -> None:
        self.expected = expected
        _Reloadable.__init__(self, material)

    def expecting(self, expected: Expected) -> _Expecting:
        """
        A creator that shares this one's context (and its reloads) but expects another
        peer: the explorer's proxy makes one per node id without re-reading any file.

        :param expected: an :class:`Expected` peer
        """
        return _Expecting(self, expected)

    def _verify(
        self,
        credentials: Credentials,
        connection: SSL.Connection,
        cert: crypto.X509,
        errno: int,
        depth: int,
        ok: int,
    ) -> bool:
        if not ok or depth != 0:
            return bool(ok)
        return self._check_peer(credentials, self.expected, cert)

    def _check_peer(
        self, credentials: Credentials, expected: Expected | None, cert: crypto.X509
    ) -> bool:
        identity = identity_of(cert, credentials.trust_domain)
        if expected is None or identity is None or not expected.allows(identity):
            log.warn(
                "TLS peer refused: its certificate names {identity}, expected {expected}",
                identity=identity,
                expected=expected,
            )
            return False
        return self.accepts(identity, cert.get_serial_number(), not_before(cert))

    def accepts(self, identity: PeerIdentity, serial: int, not_before: float) -> bool:
        """
        :param identity: what the peer's certificate names (already found to be the
            expected peer)
        :param serial: its serial
        :param not_before: its ``not_valid_before`` (Unix seconds)
        :return: whether :attr:`peer_check` (if any) accepts it, at the handshake or
            when a pooled connection is reused; logs why not
        """
        check = self.peer_check
        if check is None:
            return True
        reason = check(identity, serial, not_before)
        if reason is None:
            return True
        log.warn("TLS peer {identity} refused: {reason}", identity=identity, reason=reason)
        return False

    def peer_of(self, transport: object) -> tuple[PeerIdentity, int, float] | None:
        """
        :param transport: a connection's TLS transport, its handshake done
        :return: ``(identity, serial, not_before)`` of its peer's certificate, or None
        """
        get = getattr(transport, "getPeerCertificate", None)
        cert = get() if get is not None else None
        if cert is None:
            return None
        identity = identity_of(cert, self.credentials.trust_domain)
        if identity is None:
            return None
        return identity, cert.get_serial_number(), not_before(cert)

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """:return: a new :class:`OpenSSL.SSL.Connection` with the current context"""
        return SSL.Connection(self._context, None)


@implementer(IOpenSSLClientConnectionCreator)
@attrs.frozen
class _Expecting:
    """A :class:`ClientTLS` expecting one peer (see :meth:`ClientTLS.expecting`)."""

    parent: ClientTLS
    expected: Expected

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """:return: a new :class:`OpenSSL.SSL.Connection` that expects our peer"""
        parent = self.parent
        credentials = parent.credentials
        connection = SSL.Connection(parent._context, None)

        def verify(
            connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
        ) -> bool:
            if not ok or depth != 0:
                return bool(ok)
            return parent._check_peer(credentials, self.expected, cert)

        # This connection's own check: whom to expect is ours, the rest the context's.
        connection.set_verify(SSL.VERIFY_PEER, verify)
        return connection


def tls_server_factory(creator: ServerTLS, factory: Factory) -> TLSServerFactory:
    """
    Wrap a server protocol factory in TLS, to listen on any stream endpoint (a plain
    ``tcp:`` listener beside the Unix and TCP ones, in the same reactor): the standard
    library's TLS, see :mod:`.tls_server`.

    :param creator: a :class:`ServerTLS`
    :param factory: the application's protocol factory (the HTTP site)
    """
    return TLSServerFactory(creator, factory)
