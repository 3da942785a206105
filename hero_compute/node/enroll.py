"""
The node's TLS identity (CONTRACT §6): where its material lives, enrollment with a join
token and a CA pin, and when renewal is due; the service that brings the
node's TLS up is :mod:`.tls`'s.

Enrollment never sends the token to a server that has not proven, in its own handshake,
that it holds an explorer certificate of the CA with the operator's pin: the chain is
read first (:func:`~hero_compute.rpc.tls_enroll.fetch_peer_chain`, no data sent), and the
enrollment call then goes over a connection verified against that CA.
"""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING, Any

import attrs
from cryptography import x509
from twisted.logger import Logger

from hero_compute import pki
from hero_compute.rpc.errors import RpcError
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.tls import (
    ClientTLS,
    Credentials,
    Expected,
    TLSConfigError,
    TLSMaterial,
    identity_of,
)
from hero_compute.rpc.tls_enroll import ChainError, ca_from_chain, fetch_peer_chain

if TYPE_CHECKING:
    from hero_compute.rpc.addresses import Address


log = Logger()

#: The first retry of a failed renewal or enrollment, in seconds; retries back off to
#: :data:`RETRY_CAP`.
RETRY = 30.0
RETRY_CAP = 3600.0
#: The first retry of an enrollment whose explorers could not be reached.
ENROLL_RETRY = 5.0
#: Seconds allowed for each call of an enrollment or renewal.
CALL_TIMEOUT = 10.0


class EnrollmentRefused(Exception):
    """Enrollment cannot succeed by trying again: wrong pin, token refused, bad answer."""


class BadCertificate(Exception):
    """An explorer answered with a certificate that is not ours, or not of our CA."""


@attrs.frozen
class TLSFiles:
    """
    Where the node's TLS material lives (``HERO_STATE_DIR/tls/`` by default).

    :ivar cert: the node certificate (``node.pem``)
    :ivar key: its private key (``node-key.pem``, 0600)
    :ivar ca: the fleet CA certificate (``ca.pem``)
    """

    cert: str
    key: str
    ca: str

    @classmethod
    def in_state_dir(
        cls,
        state_dir: str,
        cert: str | None = None,
        key: str | None = None,
        ca: str | None = None,
    ) -> TLSFiles:
        """:return: the default files under ``state_dir/tls``, each overridable"""
        directory = os.path.join(state_dir, "tls")
        return cls(
            cert or os.path.join(directory, "node.pem"),
            key or os.path.join(directory, "node-key.pem"),
            ca or os.path.join(directory, pki.CA_FILE),
        )

    def exists(self) -> bool:
        """:return: whether the certificate, key and CA files are all there"""
        return all(os.path.exists(path) for path in (self.cert, self.key, self.ca))

    def material(self) -> TLSMaterial:
        """:return: the :class:`~hero_compute.rpc.tls.TLSMaterial` of these files"""
        return TLSMaterial(self.cert, self.key, self.ca)

    def store_ca(self, ca: x509.Certificate) -> None:
        """Write the CA certificate (atomically, 0644)."""
        _makedirs(self.ca)
        pki.write_file(self.ca, pki.dump_certificate(ca), 0o644)

    def store(self, cert: x509.Certificate, key: Any) -> None:
        """
        Write a certificate and its key, each atomically and 0600.  The key goes first:
        a crash between the two leaves a pair that fails to load loudly rather than an
        old certificate silently presented with a mismatched key.
        """
        for path in (self.key, self.cert):
            _makedirs(path)
        pki.write_file(self.key, pki.dump_private_key(key), 0o600)
        pki.write_file(self.cert, pki.dump_certificate(cert), 0o600)


def _makedirs(path) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)


def renewal_due(cert: x509.Certificate) -> float:
    """
    :param cert: a :class:`cryptography.x509.Certificate`
    :return: Unix seconds at two thirds of its life, when it should be renewed
    """
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    return start + (end - start) * 2 / 3


def issued(pem: object, ca: x509.Certificate, key: Any, node_id: str) -> x509.Certificate:
    """
    Check what an explorer issued us.

    :param pem: the certificate, PEM text (as the answer carried it: checked here)
    :param ca: the fleet CA we trust
    :param key: the key we asked a certificate for
    :return: the :class:`cryptography.x509.Certificate`
    :raises BadCertificate: unless it is for our key, names ``node/<node_id>``, is issued
        by ``ca`` and is valid now
    """
    if not isinstance(pem, str):
        raise BadCertificate("the answer carries no PEM certificate")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        credentials = Credentials(ca, cert, key)
    except (ValueError, UnicodeEncodeError):
        raise BadCertificate("the answer carries no PEM certificate") from None
    except TLSConfigError as e:
        raise BadCertificate(str(e)) from None
    identity = identity_of(cert, credentials.trust_domain)
    if not Expected("node", node_id).allows(identity):
        raise BadCertificate(
            f"the certificate names {identity or 'no identity'}, not node/{node_id}"
        )
    if cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
        raise BadCertificate("the certificate has already expired")
    return cert


async def enroll(
    reactor: Any,
    explorer: Address,
    node_id: str,
    token: str,
    pin: str,
    files: TLSFiles,
    timeout: float = CALL_TIMEOUT,
) -> x509.Certificate:
    """
    Enroll with one explorer: learn the CA from its chain, trust it only with the pin,
    send a CSR with the join token, check and store what comes back.

    :param explorer: the explorer's ``tls://`` :class:`~hero_compute.rpc.addresses.Address`
    :param files: the :class:`TLSFiles` to write
    :raises EnrollmentRefused: when trying again cannot help (the token is then not sent
        if it is the chain that is wrong)
    :raises TransportError: or a Twisted connection error, when the explorer could not
        be reached (worth trying again)
    """
    if explorer.host is None or explorer.port is None:
        raise ValueError(f"{explorer.uri}: enrollment needs a tls:// explorer")
    chain = await fetch_peer_chain(reactor, explorer.host, explorer.port, timeout)
    try:
        ca = ca_from_chain(chain, pin)
    except ChainError as e:
        raise EnrollmentRefused(
            f"{explorer.uri} is not trusted: {e} (check "
            f"NODE_CA_PIN); the join token was not sent"
        ) from None
    files.store_ca(ca)
    key = pki.make_key()
    csr = pki.make_csr(key, node_id).decode("ascii")
    client = RpcClient(
        reactor, timeout=timeout, tls=ClientTLS(Credentials(ca), Expected("explorer"))
    )
    try:
        answer = await client.call(
            explorer, "explorer.enroll", {"token": token, "csr": csr}
        )
    except RpcError as e:
        raise EnrollmentRefused(
            f"{explorer.uri} refused the enrollment: {e} "
            f"(a join token is single-use and expires: make a new "
            f"one with hero-compute token create)"
        ) from None
    finally:
        await client.close()
    try:
        if not isinstance(answer, dict):
            raise BadCertificate("the answer is not an object")
        cert = issued(answer.get("certificate"), ca, key, node_id)
    except BadCertificate as e:
        raise EnrollmentRefused(
            f"{explorer.uri} answered the enrollment with an unusable certificate: {e}"
        ) from None
    files.store(cert, key)
    return cert
