"""
The fleet's offline PKI, in the manner of ``nomad tls``: one CA per fleet, and certificates
whose single URI SAN ``spiffe://<trust-domain>/<role>/<name>`` says who their holder is.

Keys and certificates are made with :mod:`cryptography` only; nothing here encodes ASN.1
by hand.  Keys are ECDSA P-256: small certificates and cheap handshakes.

The trust domain is chosen when the CA is created and written into the CA certificate as
its own URI SAN ``spiffe://<trust-domain>``, so a CA file alone says which identities it
vouches for.  The CA pin, ``sha256:<64 hex>``, is the SHA-256 of the CA's
SubjectPublicKeyInfo DER, as kubeadm's ``--discovery-token-ca-cert-hash``: it survives
re-issuing the CA certificate with the same key.

This package knows nothing of Twisted or the network; :mod:`hero_compute.rpc.tls` builds
TLS on it.  Its modules: :mod:`.identity` (SPIFFE ids, names, pins), :mod:`.pem` (PEM
files and atomic 0600 writes) and :mod:`.ca` (the CA, keys, certificates and CSRs); every
public name is re-exported here, so ``from hero_compute import pki; pki.X`` is the way
to use them.
"""

from .ca import (
    CA_FILE,
    CA_KEY_FILE,
    CertificateAuthority,
    create_ca,
    create_cert,
    make_csr,
    make_key,
)
from .identity import (
    DEFAULT_TRUST_DOMAIN,
    ROLES,
    IdentityError,
    PkiError,
    SpiffeId,
    check_name,
    check_trust_domain,
    format_spiffe_id,
    parse_spiffe_id,
    public_key_pin,
    spki_pin,
    trust_domain_of,
    uri_sans,
)
from .pem import (
    dump_certificate,
    dump_private_key,
    load_certificate,
    load_certificates,
    load_private_key,
    read_pem_file,
    write_file,
)

__all__ = [
    "CA_FILE",
    "CA_KEY_FILE",
    "DEFAULT_TRUST_DOMAIN",
    "ROLES",
    "CertificateAuthority",
    "IdentityError",
    "PkiError",
    "SpiffeId",
    "check_name",
    "check_trust_domain",
    "create_ca",
    "create_cert",
    "dump_certificate",
    "dump_private_key",
    "format_spiffe_id",
    "load_certificate",
    "load_certificates",
    "load_private_key",
    "make_csr",
    "make_key",
    "parse_spiffe_id",
    "public_key_pin",
    "read_pem_file",
    "spki_pin",
    "trust_domain_of",
    "uri_sans",
    "write_file",
]
