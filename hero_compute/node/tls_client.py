"""
The TLS side of the node's RPC client, :class:`ClientSide`: the client is wired when
the tree is built, before any material exists (a node may still have to enroll), so it
holds this stand-in, which :class:`~hero_compute.node.tls.NodeTLS` points at the
current :class:`~hero_compute.rpc.tls.ClientTLS` once the material is loaded.
"""

from __future__ import annotations

import attrs
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from hero_compute.rpc.tls import ClientTLS, Expected, TLSConfigError


@implementer(IOpenSSLClientConnectionCreator)
class ClientSide:
    """
    The TLS side of the node's :class:`~hero_compute.rpc.http_client.RpcClient`, made
    before any material exists (the client is wired when the tree is built) and pointing
    at the :class:`~hero_compute.rpc.tls.ClientTLS` once it is loaded.

    :ivar creator: the current :class:`~hero_compute.rpc.tls.ClientTLS`, or None
    """

    creator: ClientTLS | None = None

    def _current(self) -> ClientTLS:
        if self.creator is None:
            raise TLSConfigError("no TLS material yet (the node has not enrolled)")
        return self.creator

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """:return: a connection of the current creator"""
        return self._current().clientConnectionForTLS(tlsProtocol)

    def expecting(self, expected: Expected) -> _LaterExpecting:
        """:return: a creator expecting ``expected``, resolved at connection time"""
        return _LaterExpecting(self, expected)


@implementer(IOpenSSLClientConnectionCreator)
@attrs.frozen
class _LaterExpecting:
    side: ClientSide
    expected: Expected

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        creator = self.side._current().expecting(self.expected)
        return creator.clientConnectionForTLS(tlsProtocol)
