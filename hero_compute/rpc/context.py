"""
What a JSON-RPC handler may know of a call besides its params: :class:`CallContext`,
read once per connection from its transport (Unix, TCP or TLS, and over TLS the peer's
verified identity).
"""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING, Protocol, cast

import attrs
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import ISSLTransport, ITransport

if TYPE_CHECKING:
    from OpenSSL.crypto import X509


class CallerIdentity(Protocol):
    """
    Who a call is made as, beyond its transport: a TLS peer's verified SPIFFE id
    (:class:`~hero_compute.pki.SpiffeId`), or a dashboard user.
    """

    @property
    def role(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def uri(self) -> str: ...


@attrs.frozen
class CallContext:
    """
    What a handler (and the ``authorize`` hook) may know of the call besides its params.

    :ivar transport: ``"unix"``, ``"tcp"`` or ``"tls"``: how the request reached us
    :ivar peer: the peer's address, for logs (``host:port``, or ``"unix"``)
    :ivar identity: over TLS, the verified identity of the peer's certificate
        (a :class:`~hero_compute.rpc.tls.PeerIdentity`), or None
    :ivar serial: over TLS, the serial number of the peer's certificate, or None
    :ivar host: the peer's IP address (TCP and TLS), or None
    :ivar not_before: over TLS, the ``not_valid_before`` of the peer's certificate
        (Unix seconds), or None
    :ivar uid: over a Unix socket, the peer process's user id (``SO_PEERCRED``), or
        None
    """

    transport: str
    peer: str
    identity: CallerIdentity | None = None
    serial: int | None = None
    host: str | None = None
    not_before: float | None = None
    uid: int | None = None

    @property
    def secure(self) -> bool:
        """Whether the connection is TLS."""
        return self.transport == "tls"

    @classmethod
    def from_transport(
        cls, transport: ITransport, trust_domain: str | None = None
    ) -> CallContext:
        """
        :param transport: the transport of a connection whose TLS handshake (if any) is
            done: call this once the first request has arrived
        :param trust_domain: the fleet's trust domain, to read a TLS peer's identity
        :return: the context of the calls on that connection
        """
        if isinstance(transport.getHost(), UNIXAddress):
            return cls("unix", "unix", uid=_peer_uid(transport))
        peer = transport.getPeer()
        host = getattr(peer, "host", None)
        where = f"{host or '?'}:{getattr(peer, 'port', '?')}"
        if not ISSLTransport.providedBy(transport):
            return cls("tcp", where, host=host)
        # Twisted's TLS gives pyOpenSSL's X509; the interface says only "object".
        cert = cast("X509 | None", transport.getPeerCertificate())
        if cert is None or trust_domain is None:
            return cls("tls", where, host=host)
        from .tls import identity_of, not_before

        return cls(
            "tls",
            where,
            identity_of(cert, trust_domain),
            cert.get_serial_number(),
            host,
            not_before(cert),
        )


def _peer_uid(transport: ITransport) -> int | None:
    # Who is at the other end of a Unix socket, for the audit log: the kernel's word
    # (SO_PEERCRED: pid, uid, gid), not anything the peer says.
    try:
        handle = transport.getHandle()  # type: ignore[attr-defined]
        creds = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except (AttributeError, OSError):
        return None
    return int(struct.unpack("3i", creds)[1])
