"""
Identities of the fleet's PKI: trust domains, roles and names, SPIFFE ids, the URI SANs
that carry them, and the pins of public keys.

Nothing here makes or reads a key or a file; see :mod:`.pem` and :mod:`.ca`.
"""

import hashlib
import re

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

#: The roles a certificate may name (contract §6).
ROLES = ("explorer", "node", "client")
DEFAULT_TRUST_DOMAIN = "hero-compute"

# SPIFFE: a trust domain is lowercase letters, digits, '.', '-', '_'; we add the contract's
# name rule, so an identity is exactly two path segments with nothing around them.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SPIFFE_ID = re.compile(r"spiffe://([^/?#]*)/([^/?#]*)/([^/?#]*)")
_CA_ID = re.compile(r"spiffe://([^/?#]*)")


class PkiError(Exception):
    """A PKI operation could not be done (missing CA, a file in the way, a bad CSR)."""


class IdentityError(PkiError, ValueError):
    """A trust domain, role, name or SPIFFE id that the contract does not allow."""


@attrs.frozen
class SpiffeId:
    """
    Who a certificate says its holder is: ``spiffe://<trust_domain>/<role>/<name>``.

    :ivar trust_domain: the fleet's trust domain, e.g. ``hero-compute``
    :ivar role: ``explorer``, ``node`` or ``client``
    :ivar name: the explorer or client name, or the node id
    """

    trust_domain: str
    role: str
    name: str

    @property
    def uri(self) -> str:
        """The identity as a ``spiffe://`` URI."""
        return f"spiffe://{self.trust_domain}/{self.role}/{self.name}"

    def __str__(self) -> str:
        return self.uri


def check_trust_domain(trust_domain: object) -> str:
    """
    :return: ``trust_domain`` if SPIFFE allows it (lowercase ``[a-z0-9._-]``)
    :raises IdentityError: otherwise
    """
    if (
        not isinstance(trust_domain, str)
        or not _TRUST_DOMAIN.fullmatch(trust_domain)
        or trust_domain in (".", "..")
    ):
        raise IdentityError(
            f"invalid trust domain {trust_domain!r}: use lowercase letters, digits, "
            f"'.', '-' and '_'"
        )
    return trust_domain


def check_name(role: str, name: object) -> tuple[str, str]:
    """
    :return: ``(role, name)`` if they make a valid identity
    :raises IdentityError: for an unknown role, or a name outside ``[A-Za-z0-9._-]{1,64}``
    """
    if role not in ROLES:
        raise IdentityError(f"invalid role {role!r}: expected one of {', '.join(ROLES)}")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        what = "node id" if role == "node" else f"{role} name"
        raise IdentityError(
            f"invalid {what} {name!r}: use 1 to 64 of A-Z a-z 0-9 '.' '-' '_'"
        )
    return role, name


def format_spiffe_id(trust_domain: str, role: str, name: str) -> str:
    """
    :return: the URI ``spiffe://<trust_domain>/<role>/<name>``, validated
    :raises IdentityError: if a part is invalid
    """
    check_trust_domain(trust_domain)
    check_name(role, name)
    return SpiffeId(trust_domain, role, name).uri


def parse_spiffe_id(uri: object) -> SpiffeId:
    """
    Parse a workload identity; nothing but ``spiffe://<td>/<role>/<name>`` is accepted
    (no port, user info, query, fragment, percent-encoding or further segments).

    :rtype: SpiffeId
    :raises IdentityError: if ``uri`` is not such an identity
    """
    match = _SPIFFE_ID.fullmatch(uri) if isinstance(uri, str) else None
    if match is None:
        raise IdentityError(f"not a hero_compute SPIFFE id: {uri!r}")
    trust_domain, role, name = match.groups()
    check_trust_domain(trust_domain)
    check_name(role, name)
    return SpiffeId(trust_domain, role, name)


def uri_sans(cert: x509.Certificate) -> list[str]:
    """:return: the URI SANs of ``cert``, as a list of strings (maybe empty)"""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


def trust_domain_of(ca_cert: x509.Certificate) -> str:
    """
    The trust domain a CA certificate vouches for, from its URI SAN ``spiffe://<td>``.

    :raises IdentityError: if it has no such SAN (not a hero_compute CA)
    """
    uris = uri_sans(ca_cert)
    match = _CA_ID.fullmatch(uris[0]) if len(uris) == 1 else None
    if match is None:
        raise IdentityError(
            f"not a hero_compute CA: its URI SANs are {uris!r}, expected one spiffe://<td>"
        )
    return check_trust_domain(match.group(1))


def spki_pin(cert: x509.Certificate) -> str:
    """
    The pin of a certificate's public key: ``sha256:`` and the hex SHA-256 of its
    SubjectPublicKeyInfo DER (kubeadm's discovery-token-ca-cert-hash).

    :param cert: a :class:`cryptography.x509.Certificate`
    """
    return public_key_pin(cert.public_key())


def public_key_pin(public_key: PublicKeyTypes) -> str:
    """:return: the pin of a public key, as :func:`spki_pin` of a certificate holding it"""
    return "sha256:" + hashlib.sha256(_spki(public_key)).hexdigest()


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# PEM helpers
