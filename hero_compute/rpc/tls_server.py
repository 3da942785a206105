"""
The server side of our TLS listeners on the standard library's :mod:`ssl`: an
:class:`ssl.SSLObject` over two :class:`ssl.MemoryBIO`, in C, where Twisted's
:class:`~twisted.protocols.tls.TLSMemoryBIOProtocol` calls pyOpenSSL, whose every
record costs several Python calls through ``cffi``, 32 kB buffers allocated and zeroed
per read, and an exception to find each buffer empty.  Over a heartbeat that was most
of what TLS added to the explorer's CPU per heartbeat (issue 23).

The TLS is the same: :func:`server_context` makes from the same :class:`Credentials`
what :func:`hero_compute.rpc.tls._context` makes for pyOpenSSL (TLS 1.2 or later, the
same ciphers, the chain to the fleet CA sent with our certificate, a client certificate
asked for and verified against the CA if offered, no session tickets).  Who the peer is
is read from its certificate above us, as before
(:meth:`TLSServerProtocol.getPeerCertificate` gives pyOpenSSL's ``X509``, as Twisted's
transport did).

:class:`TLSServerProtocol` keeps the behaviour of Twisted's transport that our
protocols see: the wrapped protocol is connected at once, its writes wait for the
handshake, and it is told when the handshake ends if it is an
:class:`~twisted.internet.interfaces.IHandshakeListener`; ``loseConnection`` sends
``close_notify`` (after a registered producer is unregistered) and closes once the peer
has answered it; ``abortConnection`` drops everything; a handshake or record that fails
ends the connection with the error (its alert sent first); a TCP close without
``close_notify`` is reported as :class:`~twisted.internet.error.ConnectionLost`.
Ciphertext leaves through :func:`~hero_compute.rpc.sendnow.send_now`: at once, and only
what the socket does not take is buffered by the TCP transport, whose producer calls
(``HERO_MAX_UNSENT``) our protocols get, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import ssl
from collections.abc import Iterator
from typing import Any

from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IProtocol,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from hero_compute import pki

from .sendnow import send_now

#: Forward secrecy and AEAD only, for TLS 1.2 (as :mod:`.tls`'s contexts).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

#: The most plaintext one TLS record holds: one read returns at most one record's.
_RECORD = 2**14

_UNSET: Any = object()

# OpenSSL's SSL_CTX_ctrl commands for the session cache (ssl.h).
_SET_SESS_CACHE_MODE, _GET_SESS_CACHE_MODE, _SESS_CACHE_OFF = 44, 45, 0


def server_context(credentials: Any) -> ssl.SSLContext:
    """
    The standard library's context for a TLS listener with our certificate.

    :param credentials: :class:`~hero_compute.rpc.tls.Credentials` with a certificate
    :raises ssl.SSLError: if OpenSSL refuses the material
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    # No session resumption (see .tls._context): no sealed tickets, no session cache;
    # no renegotiation.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION
    # One TLS 1.3 ticket all the same, small, naming a session no cache holds: sent as
    # the handshake ends, it acknowledges the client's last flight at once.  Without
    # it a client that writes its request right after its Finished has it held back
    # by Nagle's algorithm until our delayed ACK, 40 ms later.
    ctx.num_tickets = 1
    # A client certificate is asked for and verified if sent; a client without one
    # may still enroll and discover (what it may call is decided above us).
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=pki.dump_certificate(credentials.ca).decode())
    pem = (
        pki.dump_certificate(credentials.certificate)
        # The CA goes with the leaf: an enrolling node learns it from the chain.
        + pki.dump_certificate(credentials.ca)
        + credentials.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    # The standard library loads a key only from a file: an anonymous one in memory,
    # so the key is never written anywhere else.
    with _memory_file(pem) as path:
        ctx.load_cert_chain(path)
    _no_session_cache(ctx)
    with _memory_file(pki.dump_certificate(credentials.ca)) as path:
        _client_ca(ctx, path)
    return ctx


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """:return: the path of an anonymous file in memory holding ``data``"""
    fd = os.memfd_create("hero-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


class _LibSSL:
    """OpenSSL's ``libssl``, the one the ``_ssl`` module uses, for what it leaves out."""

    _lib: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls._lib is None:
            lib = ctypes.CDLL("libssl.so.3")
            lib.SSL_CTX_ctrl.restype = ctypes.c_long
            lib.SSL_CTX_ctrl.argtypes = [
                ctypes.c_void_p,
                ctypes.c_int,
                ctypes.c_long,
                ctypes.c_void_p,
            ]
            lib.SSL_CTX_get_options.restype = ctypes.c_uint64
            lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
            lib.OpenSSL_version_num.restype = ctypes.c_ulong
            lib.SSL_load_client_CA_file.restype = ctypes.c_void_p
            lib.SSL_load_client_CA_file.argtypes = [ctypes.c_char_p]
            lib.SSL_CTX_set_client_CA_list.restype = None
            lib.SSL_CTX_set_client_CA_list.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            lib.SSL_CTX_get_client_CA_list.restype = ctypes.c_void_p
            lib.SSL_CTX_get_client_CA_list.argtypes = [ctypes.c_void_p]
            lib.OPENSSL_sk_num.restype = ctypes.c_int
            lib.OPENSSL_sk_num.argtypes = [ctypes.c_void_p]
            cls._lib = lib
        return cls._lib


def _ssl_ctx(ctx: ssl.SSLContext) -> Any:
    """
    :return: ``libssl`` and the ``SSL_CTX`` of ``ctx``: the first field of its C object
        (CPython's ``PySSLContext``), used only once shown to be that context of this
        library (OpenSSL's version and the context's options read back as :mod:`ssl`
        has them)
    :raises ssl.SSLError: if that cannot be shown
    """
    try:
        lib = _LibSSL.get()
    except (OSError, AttributeError):
        raise ssl.SSLError("no libssl.so.3 to reach the SSL_CTX") from None
    if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise ssl.SSLError("the ssl module does not use the system's libssl.so.3")
    handle = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not handle or lib.SSL_CTX_get_options(handle) != ctx.options:
        raise ssl.SSLError("cannot find the SSL_CTX of an ssl.SSLContext")
    return lib, handle


def _client_ca(ctx: ssl.SSLContext, ca_path: str) -> None:
    """
    Name the fleet CA in our certificate request, as pyOpenSSL's ``add_client_ca``
    did (:mod:`ssl` has no setting for it): a client with several certificates, a
    browser on the dashboard, is offered only those of our CA.

    :raises ssl.SSLError: if it cannot be set
    """
    lib, handle = _ssl_ctx(ctx)
    names = lib.SSL_load_client_CA_file(ca_path.encode())
    if not names:
        raise ssl.SSLError("cannot read the CA's name for the certificate request")
    lib.SSL_CTX_set_client_CA_list(handle, names)  # the context owns them now
    if lib.OPENSSL_sk_num(lib.SSL_CTX_get_client_CA_list(handle)) != 1:
        raise ssl.SSLError("the CA's name is not in the certificate request")


def _no_session_cache(ctx: ssl.SSLContext) -> None:
    """
    Turn off the server's cache of TLS 1.2 sessions (``SSL_SESS_CACHE_OFF``), which
    :mod:`ssl` has no setting for: a client could otherwise resume a session instead of
    a full handshake, and every handshake would leave its session there.

    :raises ssl.SSLError: if the cache stays on
    """
    lib, handle = _ssl_ctx(ctx)
    lib.SSL_CTX_ctrl(handle, _SET_SESS_CACHE_MODE, _SESS_CACHE_OFF, None)
    if lib.SSL_CTX_ctrl(handle, _GET_SESS_CACHE_MODE, 0, None) != _SESS_CACHE_OFF:
        raise ssl.SSLError("the TLS session cache cannot be turned off")


@implementer(ISSLTransport)
class TLSServerProtocol(ProtocolWrapper):
    """
    The TLS transport of a connection to one of our listeners (see the module).

    :ivar factory: its :class:`TLSServerFactory`
    """

    factory: TLSServerFactory
    transport: Any
    _tls: ssl.SSLObject | None = None
    _incoming: ssl.MemoryBIO
    _outgoing: ssl.MemoryBIO
    _handshake_done = False
    #: The TLS session is over (closed, failed or cut off): nothing more is read or
    #: written, whatever the TCP connection still does.
    _tls_lost = False
    _aborted = False
    #: Why the connection ends, when TLS knows better than TCP (a failed handshake).
    _reason: Failure | None = None
    _producer: Any = None
    _peer: Any = _UNSET

    def __init__(self, factory: TLSServerFactory, wrapped: IProtocol) -> None:
        ProtocolWrapper.__init__(self, factory, wrapped)

    def makeConnection(self, transport: Any) -> None:
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = self.factory.creator.ssl_context().wrap_bio(
            self._incoming, self._outgoing, server_side=True
        )
        #: Application writes made before the handshake ended.
        self._waiting: list[bytes] = []
        ProtocolWrapper.makeConnection(self, transport)

    # -- from the peer

    def dataReceived(self, data: bytes) -> None:
        if self._tls_lost:
            return
        self._incoming.write(data)
        if not self._handshake_done:
            self._handshake()
            if not self._handshake_done:
                return
            if self._waiting:
                self._unwait()
        self._read()

    def _handshake(self) -> None:
        tls = self._tls
        assert tls is not None
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ValueError):
            self._finished(Failure())
            return
        self._handshake_done = True
        self._flush()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def _read(self) -> None:
        tls, incoming = self._tls, self._incoming
        assert tls is not None
        while not self._tls_lost:
            try:
                data = tls.read(_RECORD)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                data = b""  # close_notify, after ours
            except (ssl.SSLError, ValueError):
                self._finished(Failure())
                break
            if not data:  # the peer's close_notify
                self._shutdown()
                self._finished(None)
                break
            if not self._aborted:
                self.wrappedProtocol.dataReceived(data)
            # Nothing left to decrypt: spare the read that would only say so.
            if not incoming.pending and not tls.pending():
                break
        if self._outgoing.pending:
            self._flush()

    # -- to the peer

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            send_now(self.transport, data)

    def write(self, data: bytes) -> None:
        """
        Encrypt and send ``data`` (held until the handshake ends); dropped once
        ``loseConnection`` was called, unless a producer is still registered.
        """
        if self.disconnecting and self._producer is None:
            return
        self._write(data)

    def writeSequence(self, iovec: Any) -> None:
        """:meth:`write` the joined bytes."""
        self.write(b"".join(iovec))

    def _write(self, data: bytes) -> None:
        if self._tls_lost or not data:
            return
        if not self._handshake_done:
            self._waiting.append(data)
            if self._producer is not None:
                self._producer.pauseProducing()
            return
        tls = self._tls
        assert tls is not None
        try:
            tls.write(data)
        except (ssl.SSLError, ValueError):
            self._finished(Failure())
            return
        self._flush()

    def _unwait(self) -> None:
        waiting, self._waiting = self._waiting, []
        for data in waiting:
            self._write(data)
        if self._producer is not None:
            self._producer.resumeProducing()
        elif self.disconnecting:
            self._shutdown()

    # -- the end

    def _shutdown(self) -> None:
        """Send our ``close_notify`` (or answer the peer's); close once both went."""
        tls = self._tls
        if tls is None:
            return
        try:
            tls.unwrap()
            both = True
        except (ssl.SSLError, ValueError):
            both = False  # sent, the peer's not seen yet (or the session is broken)
        self._flush()
        if both:
            self.transport.loseConnection()

    def _finished(self, reason: Failure | None) -> None:
        """
        The TLS session ended: on our side (``reason`` None: TCP's reason stands) or
        by an error, reported to the protocol.
        """
        if self._reason is None:
            self._reason = reason
        self._tls_lost = True
        self._flush()
        self.transport.loseConnection()

    def loseConnection(self) -> None:
        """Send ``close_notify`` once what was written is, then close."""
        if self.disconnecting or not self.connected:
            return
        if not self._handshake_done and not self._waiting:
            self.abortConnection()
            return
        self.disconnecting = True
        if not self._waiting and self._producer is None:
            self._shutdown()

    def abortConnection(self) -> None:
        """Close at once: nothing more is sent or delivered."""
        self._aborted = self._tls_lost = True
        self.disconnecting = True
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._tls_lost:
            # TCP ended without the peer's close_notify: a truncation, as Twisted's
            # transport reports it.
            self._tls_lost = True
            reason = Failure(ConnectionLost("TCP closed without TLS close_notify"))
        reason = self._reason or reason
        self._reason = None
        self.connected = False
        ProtocolWrapper.connectionLost(self, reason)

    # -- producers

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Register with the TCP transport (it pauses us past its buffer size)."""
        if self._tls_lost:
            producer.stopProducing()
            return
        self.transport.registerProducer(producer, streaming)
        self._producer = producer

    def unregisterProducer(self) -> None:
        """Unregister; a ``loseConnection`` waiting for it goes on."""
        if self._producer is None:
            return
        self._producer = None
        self.transport.unregisterProducer()
        if self.disconnecting and not self._waiting:
            self._shutdown()

    # -- ISSLTransport

    def getPeerCertificate(self) -> crypto.X509 | None:
        """
        :return: the client's certificate, verified against the fleet CA in the
            handshake, as pyOpenSSL's ``X509``; None before the handshake ended or
            for a client without one
        """
        if self._peer is _UNSET:
            if not self._handshake_done or self._tls is None:
                return None
            der = self._tls.getpeercert(binary_form=True)
            self._peer = (
                None if der is None else crypto.load_certificate(crypto.FILETYPE_ASN1, der)
            )
        peer: crypto.X509 | None = self._peer
        return peer

    def getHandle(self) -> ssl.SSLObject | None:
        """:return: the connection's :class:`ssl.SSLObject`"""
        return self._tls

    @property
    def negotiatedProtocol(self) -> None:
        """No ALPN is offered: always None."""
        return None


class TLSServerFactory(WrappingFactory[TLSServerProtocol]):
    """
    TLS in front of ``factory``, on a listener of any stream endpoint.

    :param creator: a :class:`~hero_compute.rpc.tls.ServerTLS` (reloadable: a new
        connection uses its context of the moment)
    :param factory: the application's protocol factory (the HTTP site)
    """

    protocol: type[TLSServerProtocol] = TLSServerProtocol
    noisy = False

    def __init__(self, creator: Any, factory: Factory) -> None:
        super().__init__(factory)
        self.creator = creator

    def buildProtocol(self, addr: IAddress | None) -> TLSServerProtocol:
        """:return: the TLS transport of a new connection"""
        return self.protocol(self, self.wrappedFactory.buildProtocol(addr))
