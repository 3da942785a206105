"""
The node's TLS as a service: its material loaded or enrolled for, the mutual-TLS
listener and the ``tls://`` heartbeats started once it exists, renewal past two thirds
of the certificate's life, and reload on SIGHUP.  Enrollment and the files themselves
are :mod:`.enroll`'s, the TLS side of the node's client :mod:`.tls_client`'s.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from hero_compute import pki
from hero_compute.rpc.backoff import retry_delay
from hero_compute.rpc.errors import RpcError, TransportError
from hero_compute.rpc.sighup import HangupReload
from hero_compute.rpc.tls import (
    ClientTLS,
    Credentials,
    Expected,
    ServerTLS,
    TLSConfigError,
    identity_of,
)

from .enroll import (
    CALL_TIMEOUT,
    ENROLL_RETRY,
    RETRY,
    RETRY_CAP,
    BadCertificate,
    EnrollmentRefused,
    TLSFiles,
    enroll,
    issued,
    renewal_due,
)
from .tls_client import ClientSide

if TYPE_CHECKING:
    from hero_compute.rpc.addresses import Address
    from hero_compute.rpc.http_server import RpcHTTPFactory
    from hero_compute.rpc.interfaces import IRpcClient
    from hero_compute.rpc.listen import Listen
    from hero_compute.rpc.listeners import Listeners

log = Logger()


class _Identity(Protocol):
    """What TLS reads of the node's identity (node/service.py's NodeIdentity, whose
    module imports this one)."""

    node_id: str | None


class NodeTLS(service.MultiService):
    """
    The node's TLS: loads (or enrolls for) its material, then serves the TLS listener,
    starts its children (the heartbeat loops of ``tls://`` explorers) and renews the
    certificate on time.  ``SIGHUP`` re-reads the files.

    :param reactor: the reactor (connections, ``callFromThread``)
    :param clock: an ``IReactorTime`` scheduling renewals and retries
    :param files: the :class:`TLSFiles`
    :param identity: the node's identity (``node_id``, known once started)
    :param listeners: the node's :class:`~hero_compute.rpc.listeners.Listeners`
    :param factory: the node's HTTP factory, whose ``trust_domain`` is set once loaded
    :param listen: the TLS :class:`~hero_compute.rpc.listen.Listen`, or None
    :param explorers: the ``tls://`` explorer addresses (enrollment, renewal)
    :param client: the node's RPC client (its TLS side is ``client_side``)
    :param client_side: the :class:`ClientSide` of that client
    :param join_token: ``NODE_JOIN_TOKEN``, or None
    :param ca_pin: ``NODE_CA_PIN``, or None
    :param stop: called (no arguments) when the node cannot go on: enrollment refused
    """

    def __init__(
        self,
        *,
        reactor: Any,
        clock: IReactorTime,
        files: TLSFiles,
        identity: _Identity,
        listeners: Listeners,
        factory: RpcHTTPFactory,
        listen: Listen | None,
        explorers: Iterable[Address],
        client: IRpcClient,
        client_side: ClientSide,
        join_token: str | None = None,
        ca_pin: str | None = None,
        stop: Callable[[], object] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        service.MultiService.__init__(self)
        self._reactor, self._clock, self._files = reactor, clock, files
        self._identity, self._listeners, self._factory = identity, listeners, factory
        self._listen, self._explorers = listen, list(explorers)
        self._client, self._client_side = client, client_side
        self._token, self._pin = join_token, ca_pin
        self._stop = stop if stop is not None else (lambda: None)
        self._rand = rand
        #: The :class:`~hero_compute.rpc.tls.ServerTLS` of the listener, once loaded.
        self.server_tls: ServerTLS | None = None
        self._listener: service.Service | None = None
        self._working: defer.Deferred[Any] | None = None  # the enrollment or renewal
        self._renewal: IDelayedCall | None = None  # the next renewal
        self._failures = 0
        self._hangup = HangupReload(
            reactor,
            self._reload_on_signal,
            (TLSConfigError, pki.PkiError),
            "TLS material",
        )

    @property
    def credentials(self) -> Credentials | None:
        """The :class:`~hero_compute.rpc.tls.Credentials` in use, or None."""
        creator = self._client_side.creator
        return creator.credentials if creator is not None else None

    def prepare(self) -> None:
        """
        Load the material if the files exist, and add the TLS listener; done once,
        before the listeners start when it can be (so a listener that cannot bind aborts
        start-up).

        :raises TLSConfigError: if the files exist but cannot be used
        """
        if self.credentials is None and self._files.exists():
            self._load()

    def _in_use(self) -> Credentials:
        """The credentials in use, once loaded (everything that calls this runs after)."""
        credentials = self.credentials
        assert credentials is not None
        return credentials

    def _certificate(self) -> x509.Certificate:
        """Our certificate in use (a node's material always has one), once loaded."""
        cert = self._in_use().certificate
        assert cert is not None
        return cert

    def _node_id(self) -> str:
        """The node's id: the node loads it before it starts its children, us."""
        node_id = self._identity.node_id
        assert node_id is not None
        return node_id

    def _load(self) -> None:
        material = self._files.material()
        client = ClientTLS(material, Expected("explorer"))
        listen = self._listen
        if listen is not None:
            self.server_tls = server_tls = ServerTLS(material)
        self._client_side.creator = client
        self._factory.trust_domain = client.trust_domain
        if listen is not None and self._listener is None:
            self._listener = self._listeners.add_tls(listen, server_tls, self._reactor)

    def startService(self) -> None:
        # Not MultiService's: the children (TLS heartbeats) wait for the material.
        service.Service.startService(self)
        self._hangup.install()
        self.prepare()
        if self.credentials is not None:
            self._ready()
        elif self._token and self._pin and self._explorers:
            self._working = defer.ensureDeferred(self._enroll(self._token, self._pin))
            self._working.addErrback(lambda f: f.trap(defer.CancelledError))
        else:
            raise TLSConfigError(
                f"no TLS material at {self._files.cert}: set NODE_JOIN_TOKEN and "
                f"NODE_CA_PIN to enroll with a tls:// explorer, or make a certificate "
                f"with hero-compute tls cert create --node {self._identity.node_id}"
            )

    def stopService(self) -> defer.Deferred[None]:
        self._hangup.restore()
        if self._renewal is not None and self._renewal.active():
            self._renewal.cancel()
        self._renewal = None
        if self._working is not None:
            self._working.cancel()
        return service.MultiService.stopService(self)

    def _ready(self) -> None:
        cert = self._certificate()
        log.info(
            "TLS identity {identity}, certificate valid until {until}",
            identity=identity_of(cert, self._in_use().trust_domain),
            until=cert.not_valid_after_utc.isoformat(),
        )
        for child in self:
            child.startService()
        self._schedule_renewal()

    async def _enroll(self, token: str, pin: str) -> None:
        node_id = self._node_id()
        failures = 0
        while self.running:
            for explorer in self._explorers:
                try:
                    await enroll(
                        self._reactor,
                        explorer,
                        node_id,
                        token,
                        pin,
                        self._files,
                    )
                except defer.CancelledError:
                    raise
                except EnrollmentRefused as e:
                    log.error("enrollment refused, the node stops: {reason}", reason=str(e))
                    self._stop()
                    return
                except Exception as e:
                    if failures == 0:
                        log.warn(
                            "enrollment with {uri} failed, will retry: {reason}",
                            uri=explorer.uri,
                            reason=str(e) or type(e).__name__,
                        )
                    continue
                log.info(
                    "enrolled with {uri} as node/{node_id}; material stored in "
                    "{cert}, the join token is no longer needed",
                    uri=explorer.uri,
                    node_id=node_id,
                    cert=self._files.cert,
                )
                try:
                    self._load()
                    self._ready()
                except Exception:
                    log.failure("TLS could not start after enrollment; the node stops")
                    self._stop()
                return
            failures += 1
            await task.deferLater(
                self._clock, self._retry_delay(failures, ENROLL_RETRY), lambda: None
            )

    def _retry_delay(self, failures, first=RETRY):
        # Jittered as heartbeats are: a fleet whose explorer was down does not come
        # back to it in lockstep.
        return retry_delay(failures, first, RETRY_CAP, self._rand)

    # Renewal

    def _schedule_renewal(self, delay=None):
        if not self.running:
            return
        if self._renewal is not None and self._renewal.active():
            self._renewal.cancel()
        if delay is None:
            due = renewal_due(self._certificate())
            delay = max(0.0, due - self._clock.seconds())
        self._renewal = self._clock.callLater(delay, self._renew_now)

    def _renew_now(self):
        self._renewal = None
        self._working = defer.ensureDeferred(self.renew())
        self._working.addCallbacks(self._renewed, self._renew_failed)
        self._working.addErrback(lambda f: log.failure("renewal bookkeeping failed", f))

    async def renew(self) -> x509.Certificate:
        """
        Renew the certificate now with the first ``tls://`` explorer that answers: a new
        key, its CSR over the current certificate, the answer checked, stored, reloaded.

        :return: the new certificate
        :raises BadCertificate: if the answer is unusable
        :raises TransportError: or :class:`RpcError`, if no explorer renewed it
        """
        node_id = self._node_id()
        key = pki.make_key()
        csr = pki.make_csr(key, node_id).decode("ascii")
        reasons = []
        for explorer in self._explorers:
            try:
                answer = await self._client.call(
                    explorer, "explorer.renew", {"csr": csr}, timeout=CALL_TIMEOUT
                )
            except (RpcError, TransportError) as e:
                reasons.append(f"{explorer.uri}: {e}")
                continue
            if not isinstance(answer, dict):
                raise BadCertificate(f"{explorer.uri}: the answer is not an object")
            cert = issued(answer.get("certificate"), self._in_use().ca, key, node_id)
            self._files.store(cert, key)
            self.reload()
            return cert
        raise TransportError(
            ", ".join(e.uri for e in self._explorers) or "no explorer",
            "; ".join(reasons) or "no tls:// explorer to renew with",
        )

    def _renewed(self, cert):
        self._working = None
        self._failures = 0
        due = renewal_due(cert)
        log.info(
            "certificate renewed, valid until {until}; next renewal at {due}",
            until=cert.not_valid_after_utc.isoformat(),
            due=datetime.datetime.fromtimestamp(due, datetime.UTC).isoformat(),
        )
        if due <= self._clock.seconds():
            # A certificate due at once (a CA near its own end, or a skewed clock) must not
            # make the node hammer its explorers.
            log.warn("the renewed certificate is already past two thirds of its life")
            self._failures = 1
            self._schedule_renewal(self._retry_delay(1))
        else:
            self._schedule_renewal()

    def _renew_failed(self, failure):
        self._working = None
        if failure.check(defer.CancelledError):
            return
        self._failures += 1
        delay = self._retry_delay(self._failures)
        log.warn(
            "certificate renewal failed (attempt {n}), retrying in {delay:.0f} s: {reason}",
            n=self._failures,
            delay=delay,
            reason=failure.getErrorMessage() or failure.type.__name__,
        )
        self._schedule_renewal(delay)

    def reload(self) -> None:
        """
        Re-read the files: new connections (the listener's and the client's) use them,
        open ones go on; the next renewal follows the new certificate.

        :raises TLSConfigError: if they cannot be used; the old material stays in use
        """
        creator = self._client_side.creator
        if creator is None:
            raise TLSConfigError("no TLS material loaded yet")
        # Both checked before either is used: a half-applied reload would make the node
        # present one certificate and dial with another.
        material = self._files.material()
        material.load()
        creator.reload()
        if self.server_tls is not None:
            self.server_tls.reload()
        # Pooled connections still present the old certificate: renewal is accepted
        # only from the current one.
        self._client.retire_connections()
        if self._working is None:
            self._schedule_renewal()

    def _reload_on_signal(self):
        """SIGHUP's reload: :meth:`reload`, and what it did, for the log."""
        self.reload()
        cert = self._certificate()
        return (
            f"TLS material reloaded from {self._files.cert}, certificate valid until "
            f"{cert.not_valid_after_utc.isoformat()}"
        )
