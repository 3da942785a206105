"""
TLS for enrollment: a node with a join token and a CA pin, but no certificate yet, learns
the fleet CA from the explorer's own handshake (:func:`fetch_peer_chain`), checks it
against the pin (:func:`ca_from_chain`), and only then talks to the explorer over an
ordinary verified connection, so the token never goes to a server that has not proven
it holds a certificate of the pinned CA.

Import these from :mod:`hero_compute.rpc.tls`, which re-exports them.
"""

from __future__ import annotations

from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from OpenSSL import SSL
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IReactorTCP,
    IReactorTime,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from hero_compute import pki

from .tls import Expected, identity_of


class ChainError(Exception):
    """A server's certificate chain does not prove what enrollment needs (see the text)."""


@implementer(IOpenSSLClientConnectionCreator)
class _AnyServer:
    """A client TLS side that verifies nothing: only for reading a chain, never data."""

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_verify(SSL.VERIFY_NONE)
        return SSL.Connection(ctx, None)


@implementer(IHandshakeListener)
class _ChainReader(protocol.Protocol):
    """Takes the server's chain once the handshake is done, sends nothing, hangs up."""

    def __init__(self, done: defer.Deferred[list[x509.Certificate]] | None) -> None:
        self._done = done

    def handshakeCompleted(self) -> None:
        transport: Any = self.transport  # a TLS transport, with the OpenSSL connection
        handle: SSL.Connection = transport.getHandle()
        chain = handle.get_peer_cert_chain(as_cryptography=True) or []
        done, self._done = self._done, None
        transport.loseConnection()
        if done is not None and not done.called:
            done.callback(chain)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        done, self._done = self._done, None
        if done is not None and not done.called:
            done.errback(reason)


def fetch_peer_chain(
    reactor: IReactorTCP, host: str, port: int, timeout: float = 10
) -> defer.Deferred[list[x509.Certificate]]:
    """
    The certificate chain a TLS server presents, from a handshake that verifies nothing
    and after which the connection is closed without a byte of application data.

    :param reactor: the reactor (TCP and time)
    :param host: an IP address or DNS name
    :param port: the TLS port
    :param timeout: seconds for the whole exchange
    :return: a Deferred of a list of :class:`cryptography.x509.Certificate`, leaf first;
        it fails if the server cannot be reached or the handshake fails, and with
        :class:`twisted.internet.defer.TimeoutError` after ``timeout``
    """
    connecting: defer.Deferred[IProtocol] | None = None
    reader: _ChainReader | None = None
    cancelled = False

    def cancel(d: defer.Deferred[list[x509.Certificate]]) -> None:
        # Whatever the teardown reports, the caller sees the cancellation (or timeout).
        nonlocal cancelled
        cancelled = True
        if reader is not None:
            reader._done = None
            transport: Any = reader.transport
            transport.abortConnection()
        elif connecting is not None:
            connecting.cancel()

    done: defer.Deferred[list[x509.Certificate]] = defer.Deferred(cancel)
    factory = protocol.Factory.forProtocol(lambda: _ChainReader(done))
    endpoint = wrapClientTLS(_AnyServer(), HostnameEndpoint(reactor, host, port, timeout))
    connecting = attempt = endpoint.connect(factory)

    def connected(proto: IProtocol) -> None:
        nonlocal reader
        assert isinstance(proto, _ChainReader)
        reader = proto

    def failed(failure: Failure) -> None:
        if not cancelled and not done.called:
            done.errback(failure)

    attempt.addCallbacks(connected, failed)
    done.addTimeout(timeout, cast(IReactorTime, reactor))  # a reactor is both
    return done


def ca_from_chain(chain: list[x509.Certificate], pin: str) -> x509.Certificate:
    """
    The fleet CA from a chain got by :func:`fetch_peer_chain`, if the chain proves the
    server holds an explorer certificate of the CA with that pin.

    :param chain: the certificates, leaf first
    :param pin: the CA pin, ``sha256:<64 hex>`` (``NODE_CA_PIN``)
    :return: the CA :class:`cryptography.x509.Certificate`
    :raises ChainError: saying why the chain is refused
    """
    pin = pin.strip().lower()
    if not chain:
        raise ChainError("the server presented no certificate")
    leaf = chain[0]
    pinned = [cert for cert in chain if pki.spki_pin(cert) == pin]
    if not pinned:
        raise ChainError(
            f"no certificate in the server's chain has the pin {pin}: "
            f"wrong pin, or not this fleet's explorer"
        )
    ca = pinned[0]
    try:
        trust_domain = pki.trust_domain_of(ca)
    except pki.IdentityError as e:
        raise ChainError(f"the pinned certificate is not a fleet CA: {e}") from None
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ChainError(
            "the server's certificate is not issued by the pinned CA"
        ) from None
    identity = identity_of(leaf, trust_domain)
    if not Expected("explorer").allows(identity):
        raise ChainError(
            f"the server's certificate names {identity or 'no identity'} "
            f"of trust domain {trust_domain}, not an explorer"
        )
    return ca
