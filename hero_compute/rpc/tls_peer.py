"""
Who a TLS peer is: the SPIFFE identity its certificate names (contract §6), read with
``service_identity`` and ``cryptography``, and whom a client expects to reach.  Apart
from :mod:`.tls` (the contexts that check it), so either stays small; :mod:`.tls`
re-exports all of it.

``service_identity`` matches a URI-ID only on its scheme and host, so it cannot check a
path; and it splits a URI pattern at the colon, keeping ``//host/path`` as the host, so
``URI_ID("spiffe://td")`` would match no ``spiffe://td/...`` SAN as extracted.  We
therefore give it each URI pattern's authority (``td``) to match, which keeps its
DNS-name rules (case, IDNA) for the trust domain.
"""

from __future__ import annotations

from typing import Any

import attrs
from cryptography import x509
from OpenSSL import crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import extract_patterns
from service_identity.hazmat import URI_ID, DNSPattern, URIPattern, verify_service_identity

from hero_compute import pki

#: Who a peer's certificate says it is (the same record the PKI issues).
PeerIdentity = pki.SpiffeId


def _cryptography(cert: x509.Certificate | crypto.X509) -> x509.Certificate:
    return cert.to_cryptography() if isinstance(cert, crypto.X509) else cert


def _authority(pattern: Any) -> Any:  # service_identity has no types
    # service_identity keeps "//td/role/name" as the host of spiffe://td/role/name.
    host = pattern.dns_pattern.pattern.removeprefix(b"//").split(b"/", 1)[0]
    return URIPattern(
        protocol_pattern=pattern.protocol_pattern, dns_pattern=DNSPattern.from_bytes(host)
    )


def identity_of(
    cert: x509.Certificate | crypto.X509, trust_domain: str
) -> PeerIdentity | None:
    """
    The identity a certificate names in a trust domain.

    Only the name is read here; that the certificate chains to the fleet CA is for the
    TLS handshake (or the caller) to have checked.

    :param cert: a :class:`cryptography.x509.Certificate` or :class:`OpenSSL.crypto.X509`
    :param trust_domain: the fleet's trust domain
    :return: a :class:`PeerIdentity`, or ``None`` if the certificate does not carry
        exactly one URI SAN that is a valid ``spiffe://<trust_domain>/<role>/<name>``
    """
    cert = _cryptography(cert)
    uris = pki.uri_sans(cert)
    if len(uris) != 1:  # an X.509-SVID has exactly one URI SAN
        return None
    try:
        identity = pki.parse_spiffe_id(uris[0])
        patterns = [
            _authority(p) for p in extract_patterns(cert) if isinstance(p, URIPattern)
        ]
        verify_service_identity(patterns, [URI_ID(f"spiffe://{trust_domain}")], [])
    except (pki.IdentityError, CertificateError, VerificationError, ValueError):
        return None
    if identity.trust_domain != trust_domain:
        return None
    return identity


def not_before(cert: x509.Certificate | crypto.X509) -> float:
    """:return: the certificate's ``not_valid_before``, in Unix seconds"""
    return _cryptography(cert).not_valid_before_utc.timestamp()


def peer_identity(transport: object, trust_domain: str) -> PeerIdentity | None:
    """
    The identity of the peer on a TLS transport made by :class:`ServerTLS` or
    :class:`ClientTLS`, whose handshake verified the peer's chain against the fleet CA.

    :param transport: a protocol's ``transport`` (a Twisted TLS transport; anything else
        has no peer identity)
    :return: a :class:`PeerIdentity`, or ``None`` (no TLS, no client certificate, or no
        valid identity in ``trust_domain``)
    """
    get = getattr(transport, "getPeerCertificate", None)
    cert = get() if get is not None else None
    return identity_of(cert, trust_domain) if cert is not None else None


@attrs.frozen
class Expected:
    """
    Whom a client means to reach: one identity (``Expected("node", node_id)``, the
    explorer's proxy) or any holder of a role (``Expected("explorer")``, a node).
    """

    role: str
    name: str | None = None

    def allows(self, identity: PeerIdentity | None) -> bool:
        """:return: whether ``identity`` (a :class:`PeerIdentity` or ``None``) fits"""
        return (
            identity is not None
            and identity.role == self.role
            and (self.name is None or identity.name == self.name)
        )

    def __str__(self) -> str:
        return f"{self.role}/{self.name if self.name is not None else '*'}"
