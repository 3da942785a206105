"""
The server side of our TLS listeners on the standard library's :mod:`ssl`: an
:class:`ssl.SSLObject` over two :class:`ssl.MemoryBIO`, in C, where Twisted's
:class:`~twisted.protocols.tls.TLSMemoryBIOProtocol` calls pyOpenSSL, whose every
record costs several Python calls through ``cffi``, 32 kB buffers allocated and zeroed
per read, and an exception to find each buffer empty.  Over a heartbeat that was most
of what TLS added to the explorer's CPU per heartbeat (issue 23).

The TLS is the same: :func:`.tls_context.server_context` makes from the same
credentials what :mod:`.tls` makes for pyOpenSSL.  Who the peer is is read from its
certificate above us, as before
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

import ssl
from typing import Any

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

from .sendnow import send_now

#: The most plaintext one TLS record holds: one read returns at most one record's.
_RECORD = 2**14


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
    #: Application writes made before the handshake ended (a list only when there are:
    #: the empty tuple is shared, not one list more for each connection).
    _waiting: list[bytes] | tuple[()] = ()

    def __init__(self, factory: TLSServerFactory, wrapped: IProtocol) -> None:
        ProtocolWrapper.__init__(self, factory, wrapped)

    def makeConnection(self, transport: Any) -> None:
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = self.factory.creator.ssl_context().wrap_bio(
            self._incoming, self._outgoing, server_side=True
        )
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
        self._handshake_ended()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def _handshake_ended(self) -> None:
        """The handshake has just succeeded (a hook for subclasses)."""

    def _read(self) -> None:
        tls, incoming = self._tls, self._incoming
        assert tls is not None
        while not self._tls_lost:
            # Asked for no more than the ciphertext waiting plus the plaintext OpenSSL
            # holds: the answer's bytes are made at that size, not at 16 kB and then
            # shrunk, whose large allocation (with the consolidation of malloc's free
            # lists it sets off) cost more than the decryption (issue 23).  The held
            # plaintext counts: a record's rest behind one byte of the next must come
            # in one read, not a byte per call.
            size = min(incoming.pending + tls.pending(), _RECORD) or _RECORD
            try:
                data = tls.read(size)
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
        if self._handshake_done and not self.disconnecting and not self._tls_lost and data:
            # An answer on an established connection: the one path to keep short.
            if self._encrypt(data):
                send_now(self.transport, self._outgoing.read())
            return
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
            if not self._waiting:
                self._waiting = []
            self._waiting.append(data)
            if self._producer is not None:
                self._producer.pauseProducing()
            return
        if self._encrypt(data):
            self._flush()

    def _encrypt(self, data: bytes) -> bool:
        """:return: whether ``data`` is encrypted into the outgoing BIO (else lost)"""
        tls = self._tls
        assert tls is not None
        try:
            tls.write(data)
        except (ssl.SSLError, ValueError):
            self._finished(Failure())
            return False
        return True

    def _unwait(self) -> None:
        waiting, self._waiting = self._waiting, ()
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
            handshake, as pyOpenSSL's ``X509``, a new one on each call (our callers ask
            once per connection: kept, it held 4.9 kB for each of thousands of idle
            connections); None before the handshake ended or for a client without one
        """
        if not self._handshake_done or self._tls is None:
            return None
        der = self._tls.getpeercert(binary_form=True)
        return None if der is None else crypto.load_certificate(crypto.FILETYPE_ASN1, der)

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
