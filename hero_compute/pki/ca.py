"""
The fleet CA: creating it, loading it, and issuing identity certificates (from a public
key, or from a node's certificate signing request).
"""

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable
from typing import cast

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .identity import (
    DEFAULT_TRUST_DOMAIN,
    IdentityError,
    PkiError,
    _spki,
    check_name,
    check_trust_domain,
    format_spiffe_id,
    spki_pin,
    trust_domain_of,
)
from .pem import (
    dump_certificate,
    dump_private_key,
    load_certificate,
    load_private_key,
    write_file,
)

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
#: Slack on ``not_valid_before`` for peers whose clocks run a little behind ours.
_BACKDATE = datetime.timedelta(minutes=5)
_DNS_NAME = re.compile(r"[A-Za-z0-9*._-]{1,253}")


def make_key() -> ec.EllipticCurvePrivateKey:
    """:return: a new ECDSA P-256 private key"""
    return ec.generate_private_key(ec.SECP256R1())


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now if now is not None else datetime.datetime.now(datetime.UTC)


def _key_usage(**flags: bool) -> x509.KeyUsage:
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


def _usable_public_key(
    key: CertificatePublicKeyTypes,
) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in ("secp256r1", "secp384r1"):
            return key
    elif isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key
    raise PkiError("unsupported key: use ECDSA P-256/P-384 or RSA of 2048 bits or more")


def create_ca(
    directory: str | os.PathLike[str],
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    days: int = 3650,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> str:
    """
    Create the fleet CA: ``directory/ca.pem`` (0644) and ``directory/ca-key.pem`` (0600).

    :param directory: created (0700) when missing
    :param trust_domain: written into the CA as its URI SAN ``spiffe://<trust_domain>``
    :param days: validity
    :param force: replace an existing CA (every certificate it issued stops being trusted)
    :param now: the issue time (tests); default the current time
    :return: the CA pin, ``sha256:<64 hex>``
    :raises PkiError: if a CA is already there and ``force`` is false
    """
    check_trust_domain(trust_domain)
    if days < 1:
        raise IdentityError(f"invalid validity {days} days: at least 1")
    cert_path = os.path.join(directory, CA_FILE)
    key_path = os.path.join(directory, CA_KEY_FILE)
    if not force:
        for path in (cert_path, key_path):
            if os.path.lexists(path):
                raise PkiError(f"{path} exists; refusing to overwrite a CA (use --force)")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    now = _now(now)
    key = make_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    # The key first: a ca.pem without its key is a half-made CA nobody can use.
    write_file(key_path, dump_private_key(key), 0o600)
    write_file(cert_path, dump_certificate(cert), 0o644)
    return spki_pin(cert)


def _issuer(key: object) -> CertificateIssuerPrivateKeyTypes:
    # Any private key PEM loads; whether it is the certificate's (and so one that can
    # sign) is checked when the CA is made.
    return cast(CertificateIssuerPrivateKeyTypes, key)


@attrs.frozen
class CertificateAuthority:
    """
    The fleet CA: its certificate and key, issuing identity certificates.

    :ivar certificate: the CA certificate
    :ivar key: its private key
    :ivar trust_domain: read from the certificate's URI SAN
    """

    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes = attrs.field(repr=False)
    trust_domain: str = attrs.field(init=False)

    @trust_domain.default
    def _trust_domain(self) -> str:
        return trust_domain_of(self.certificate)

    def __attrs_post_init__(self) -> None:
        if _spki(self.key.public_key()) != _spki(self.certificate.public_key()):
            raise PkiError("the CA key does not belong to the CA certificate")

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str]) -> "CertificateAuthority":
        """
        Load ``directory/ca.pem`` and ``directory/ca-key.pem``.

        :raises PkiError: if either is missing or unusable
        """
        if not os.path.isdir(directory):
            raise PkiError(
                f"CA directory {directory} does not exist "
                f"(create one with: hero-compute tls ca create --dir {directory})"
            )
        return cls(
            load_certificate(os.path.join(directory, CA_FILE)),
            _issuer(load_private_key(os.path.join(directory, CA_KEY_FILE))),
        )

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> "CertificateAuthority":
        """Load a CA from PEM bytes of its certificate and its private key."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise PkiError(f"not a PEM CA certificate and key: {e}") from None
        return cls(cert, _issuer(key))

    @property
    def pin(self) -> str:
        """The CA pin, ``sha256:<64 hex>``."""
        return spki_pin(self.certificate)

    def issue(
        self,
        role: str,
        name: str,
        public_key: CertificatePublicKeyTypes,
        dns: Iterable[str] = (),
        ips: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
        days: float = 90,
        now: datetime.datetime | None = None,
    ) -> x509.Certificate:
        """
        Issue an identity certificate.

        :param role: ``explorer``, ``node`` or ``client``
        :param name: the name (the node id for a node)
        :param public_key: the holder's public key
        :param dns: DNS names to add as SANs
        :param ips: IP addresses (strings or :mod:`ipaddress` objects) to add as SANs
        :param days: validity, cut to the CA's own end of validity
        :param now: the issue time (tests); default the current time
        :return: a :class:`cryptography.x509.Certificate` with exactly one URI SAN,
            ``spiffe://<trust_domain>/<role>/<name>``, for both TLS server and client use
        :raises IdentityError: for an invalid role, name, DNS name or address
        """
        uri = format_spiffe_id(self.trust_domain, role, name)
        # Fractions of a day are fine: an explorer may be told to sign certificates of
        # minutes (EXPLORER_NODE_CERT_TTL), e.g. to exercise renewal.
        if not days > 0:
            raise IdentityError(f"invalid validity {days} days: must be positive")
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
        for host in dns:
            if not isinstance(host, str) or not _DNS_NAME.fullmatch(host):
                raise IdentityError(f"invalid DNS name {host!r}")
            sans.append(x509.DNSName(host.lower()))
        for ip in ips:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError:
                raise IdentityError(f"invalid IP address {ip!r}") from None
        public_key = _usable_public_key(public_key)
        now = _now(now)
        not_after = min(
            now + datetime.timedelta(days=days), self.certificate.not_valid_after_utc
        )
        ca_ski = self.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            # Never more than a tenth of the life: a holder renews at two thirds of
            # not_before..not_after, which a long slack would skew for short lives.
            .not_valid_before(now - min(_BACKDATE, datetime.timedelta(days=days) / 10))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(
                    digital_signature=True,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def sign_csr(
        self,
        csr_pem: bytes | str,
        role: str,
        name: str,
        days: float = 90,
        now: datetime.datetime | None = None,
    ) -> x509.Certificate:
        """
        Issue a certificate for the key of a certificate signing request.

        Only the CSR's public key is used: whatever names or extensions it asks for are
        ignored, the caller decides ``role`` and ``name`` (from a token, or from the
        certificate the renewal came over).

        :param csr_pem: the CSR, PEM (bytes or str)
        :raises PkiError: if it is not a PEM CSR, its signature is wrong (the sender does
            not hold the key), or its key type is unsupported
        """
        if isinstance(csr_pem, str):
            csr_pem = csr_pem.encode("ascii", "replace")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise PkiError("not a PEM certificate signing request") from None
        try:
            valid = csr.is_signature_valid
        except (ValueError, InvalidSignature):
            valid = False
        if not valid:
            raise PkiError("the CSR's signature does not verify")
        return self.issue(role, name, csr.public_key(), days=days, now=now)


def make_csr(key: CertificateIssuerPrivateKeyTypes, node_id: str) -> bytes:
    """
    A node's certificate signing request, for enrollment or renewal.

    :param key: the node's private key (:func:`make_key`)
    :param node_id: the node id, as the subject's common name (informative only: the
        explorer decides the identity)
    :return: the CSR as PEM bytes
    """
    check_name("node", node_id)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def create_cert(
    ca_dir: str | os.PathLike[str],
    role: str,
    name: str,
    dns: Iterable[str] = (),
    ips: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    days: float = 90,
    out: str | None = None,
    force: bool = False,
) -> tuple[str, str]:
    """
    Issue a certificate and a new key with the CA in ``ca_dir``, and write them to
    ``PREFIX.pem`` (0644) and ``PREFIX-key.pem`` (0600).

    :param out: ``PREFIX``; default ``<role>-<name>`` in the current directory
    :param force: replace existing files
    :return: ``(cert_path, key_path)``
    :raises IdentityError: for an invalid role, name, DNS name or address
    :raises PkiError: for a missing CA, or files in the way
    """
    check_name(role, name)
    prefix = out if out is not None else f"{role}-{name}"
    cert_path, key_path = f"{prefix}.pem", f"{prefix}-key.pem"
    ca = CertificateAuthority.from_directory(ca_dir)
    key = make_key()
    cert = ca.issue(role, name, key.public_key(), dns=dns, ips=ips, days=days)
    if not force:
        for path in (cert_path, key_path):
            if os.path.lexists(path):
                raise PkiError(f"{path} exists; refusing to overwrite it (use --force)")
    write_file(key_path, dump_private_key(key), 0o600)
    write_file(cert_path, dump_certificate(cert), 0o644)
    return cert_path, key_path
