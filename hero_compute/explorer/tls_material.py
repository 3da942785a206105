"""
The explorer's TLS material as a service (CONTRACT §6): loaded when the explorer
starts, before the listeners bind (the mutual-TLS listener is added to them here), the
proxy's client certificate, and the fleet CA key that signs enrollments and renewals;
reloaded from its files on SIGHUP.
"""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import service
from twisted.internet.interfaces import IReactorTime

from hero_compute import pki
from hero_compute.rpc.errors import InvalidParams
from hero_compute.rpc.sighup import HangupReload
from hero_compute.rpc.tls import ClientTLS, ServerTLS, TLSConfigError, TLSMaterial

from .state import StartupError

if TYPE_CHECKING:
    from hero_compute.rpc.http_server import RpcHTTPFactory
    from hero_compute.rpc.interfaces import IRpcClient
    from hero_compute.rpc.listen import Listen
    from hero_compute.rpc.listeners import Listeners

    from .trust import ExplorerTrust


@attrs.frozen
class TLSSettings:
    """
    Where the explorer's TLS material is, and whether it serves TLS.

    :ivar listen: the ``tls`` :class:`~hero_compute.rpc.listen.Listen` of the mutual
        TLS listener (``EXPLORER_TLS_ADDR``), or None
    :ivar cert: our certificate (``explorer/<name>``), PEM file
    :ivar key: its key
    :ivar ca: the fleet CA certificate
    :ivar ca_key: the fleet CA's key, to sign enrollments and renewals, or None
    """

    listen: Listen | None
    cert: str
    key: str
    ca: str
    ca_key: str | None = None


class ExplorerTLS(service.Service):
    """
    The explorer's TLS: its listener's and its proxy's material, and the CA that signs.

    :param clock: ``IReactorTime`` (Unix seconds), the signing time
    :param reactor: the reactor (SIGHUP's reload is handed to it)
    :param settings: :class:`TLSSettings`, or None for an explorer without TLS
    :param factory: the HTTP factory, told the trust domain once the CA is loaded
    :param listeners: the :class:`~hero_compute.rpc.listeners.Listeners` the mutual-TLS
        listener joins
    :param client: the proxy's :class:`~hero_compute.rpc.http_client.RpcClient`
    :param trust: the :class:`~hero_compute.explorer.trust.ExplorerTrust`: the proxy
        checks a node's certificate with it, and it enrolls with our signer
    :param node_cert_days: life of the node certificates it signs
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        reactor: Any,
        settings: TLSSettings | None,
        factory: RpcHTTPFactory,
        listeners: Listeners,
        client: IRpcClient,
        trust: ExplorerTrust,
        node_cert_days: float = 90.0,
    ) -> None:
        self._clock = clock
        self._reactor = reactor
        self._tls = settings
        self._factory = factory
        self._listeners = listeners
        self._client = client
        self._trust = trust
        self._node_cert_days = node_cert_days
        self._loaded = False
        self._creators: list[ServerTLS | ClientTLS] = []
        self._ca: pki.CertificateAuthority | None = None
        #: The mutual-TLS side of our listeners (the dashboard may use it too).
        self.server_tls: ServerTLS | None = None
        self._hangup = HangupReload(reactor, self.reload, (TLSConfigError,), "TLS material")

    def privilegedStartService(self) -> None:
        if not self._loaded:
            self._loaded = True
            self._load()
        service.Service.privilegedStartService(self)

    def startService(self) -> None:
        if not self._loaded:
            self.privilegedStartService()
        service.Service.startService(self)

    def stopService(self) -> None:
        service.Service.stopService(self)
        self._hangup.restore()

    def _load(self) -> None:
        """Load the TLS material and add the mutual-TLS listener, before they bind."""
        tls = self._tls
        if tls is None:
            return
        present = all(os.path.exists(p) for p in (tls.cert, tls.key, tls.ca))
        if tls.listen is None and not present:
            return
        material = TLSMaterial(tls.cert, tls.key, tls.ca)
        try:
            server, proxy = ServerTLS(material), ClientTLS(material)
        except TLSConfigError as e:
            raise StartupError(
                f"TLS material unusable: {e} (EXPLORER_TLS_CERT, EXPLORER_TLS_KEY, "
                "EXPLORER_TLS_CA; make them with: "
                "hero-compute tls cert create --explorer NAME)"
            ) from None
        self._creators = [server, proxy]
        self.server_tls = server
        self._factory.trust_domain = server.trust_domain
        # The proxy talks only to a node's current, unrevoked certificate.
        proxy.peer_check = self._trust.certificate_refusal
        self._client.use_tls(proxy)
        if tls.ca_key is not None:
            ca_pem = self._load_ca(tls.ca, tls.ca_key)
            self._trust.use_signer(self._sign, ca_pem)
        if tls.listen is not None:
            self._listeners.add_tls(tls.listen, server, self._reactor)
        self._hangup.install()

    def _load_ca(self, ca: str, ca_key: str) -> str:
        try:
            cert_pem = pki.read_pem_file(ca)
            key_pem = pki.read_pem_file(ca_key)
            self._ca = pki.CertificateAuthority.from_pem(cert_pem, key_pem)
        except (OSError, pki.PkiError) as e:
            raise StartupError(
                f"cannot use the CA key {ca_key}: {e} (EXPLORER_CA_KEY)"
            ) from None
        return cert_pem.decode("ascii")

    def reload(self) -> str:
        """
        Read the TLS files again (after renewal, or new files and SIGHUP).

        :return: what was done, for the log
        :raise TLSConfigError: when they cannot be used; the old material stays in use
        """
        for creator in self._creators:
            creator.reload()
        return "TLS material reloaded"

    def _sign(self, csr_pem: str, node_id: str) -> tuple[str, int]:
        # Handed to enrollment only once the CA is loaded.
        assert self._ca is not None
        try:
            cert = self._ca.sign_csr(
                csr_pem,
                "node",
                node_id,
                days=self._node_cert_days,
                now=_utc(self._clock.seconds()),
            )
        except pki.PkiError as e:
            raise InvalidParams(f"csr: {e}") from None
        return pki.dump_certificate(cert).decode("ascii"), cert.serial_number


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)
