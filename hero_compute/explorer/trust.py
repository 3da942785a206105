"""
The explorer's side of fleet trust (CONTRACT §6), opened when the explorer starts: its
durable state (:mod:`.store`), tokens and certificates (:mod:`.enroll`), and its TLS
material (a mutual-TLS listener, the proxy's client certificate, the CA key that signs
enrollments), reloaded from its files on SIGHUP.

The handlers here are what is left once the roles table has let a call through: they
decide per node (is this the node's secret, its current certificate?), never per role.
"""

import datetime
import itertools
import os
import signal
from typing import Any

import attrs
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from hero_compute import pki
from hero_compute.rpc.errors import InvalidParams, RefusedByPolicy, StoreUnavailable
from hero_compute.rpc.tls import ClientTLS, ServerTLS, TLSConfigError, TLSMaterial

from .enroll import DEFAULT_TTL, Enrollment, csr_node_id
from .registry import NodeRecord
from .store import is_postgres, open_store

log = Logger()


#: Seconds new and changed node records wait to be written together.
FLUSH_EVERY = 1.0

#: Node records written per transaction, one transaction per reactor turn: a fleet
#: registering at once (50,000 nodes, 5,000 a second) would otherwise stop the reactor
#: ~0.2 s a second; 500 take ~10 ms.
FLUSH_CHUNK = 500


class StartupError(Exception):
    """The explorer cannot start as configured; the message says what to change."""


@attrs.frozen
class TLSSettings:
    """
    Where the explorer's TLS material is, and whether it serves TLS.

    :ivar listen: the :class:`~hero_compute.rpc.addresses.ListenAddress` of the mutual
        TLS listener (``EXPLORER_TLS_ADDR``), or None
    :ivar cert: our certificate (``explorer/<name>``), PEM file
    :ivar key: its key
    :ivar ca: the fleet CA certificate
    :ivar ca_key: the fleet CA's key, to sign enrollments and renewals, or None
    """

    listen: object
    cert: str
    key: str
    ca: str
    ca_key: str | None = None


class ExplorerTrust:
    """
    Identities, tokens, certificates and the explorer's TLS, behind the methods that
    need them.

    :param clock: ``IReactorTime`` (Unix seconds)
    :param reactor: the reactor (signals are handed to it)
    :param db_path: ``EXPLORER_DATABASE``: the SQLite state file, or a
        ``postgresql://`` URI shared with other explorers
    :param tls: :class:`TLSSettings`, or None for an explorer without TLS
    :param factory: the HTTP factory, told the trust domain once the CA is loaded
    :param node_cert_days: life of the node certificates it signs
    """

    def __init__(self, *, clock, reactor, db_path, tls, factory, node_cert_days=90.0):
        self._clock = clock
        self._reactor = reactor
        self._db_path = db_path
        self._tls = tls
        self._factory = factory
        self._node_cert_days = node_cert_days
        # The IStore once started (see store/__init__.py); None before.
        self.store: Any = None
        # A shared store is a server away: whatever writes to it runs on this one
        # thread (in call order, as the reactor would have run them), never the reactor.
        self._pool: ThreadPool | None = None
        self._enrollment: Any = None
        self._dirty = {}
        self._flusher = None
        self._creators = []
        self._ca: pki.CertificateAuthority | None = None
        self._ca_pem = None
        self._previous_hangup = None
        self.server_tls = None

    @property
    def opened(self):
        """Whether :meth:`open` has run."""
        return self.store is not None

    def open(self):
        """Open the state store; raises :class:`StartupError` if it cannot be used."""
        from .store import StoreError

        variable = (
            "EXPLORER_DATABASE" if is_postgres(self._db_path) else "EXPLORER_STATE_DIR"
        )
        try:
            self.store = open_store(self._db_path)
        except StoreError as e:
            raise StartupError(f"{e} ({variable})") from None
        except OSError as e:
            raise StartupError(
                f"cannot create the explorer state {self._db_path}: "
                f"{e.strerror} (set EXPLORER_STATE_DIR)"
            ) from None
        # No signer until the CA key is loaded: without one, enrollment is refused
        # before a token is looked at, so no token is used up for nothing.
        self._enrollment = Enrollment(self.store, self._clock)
        if self.store.shared:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="hero-store")
            self._pool.start()
        log.info(
            "state store: {kind} {location}",
            kind=self.store.kind,
            location=self.store.location,
        )

    @property
    def store_state(self):
        """``{"kind", "state"}`` of the state store, for ``explorer.info`` and metrics."""
        if self.store is None:
            kind = "postgresql" if is_postgres(self._db_path) else "sqlite"
            return {"kind": kind, "state": "down"}
        return {"kind": self.store.kind, "state": self.store.state()}

    def run_on_store(self, f, *args, **kwargs):
        """Run a store call: at once for a local file, on the store's thread otherwise."""
        if self._pool is None:
            return f(*args, **kwargs)
        return deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)

    @property
    def _enrolling(self) -> Enrollment:
        """Enrollment; only once the state file is open."""
        assert self._enrollment is not None, "the explorer's state is not open"
        return self._enrollment

    def load_nodes(self):
        """:return: the node records kept from the last run (dicts)"""
        return self.store.load_nodes()

    def start_tls(self, listeners, client):
        """
        Load the TLS material and add the mutual-TLS listener, before listeners bind.

        :param listeners: the :class:`~hero_compute.rpc.listeners.Listeners`
        :param client: the proxy's :class:`~hero_compute.rpc.http_client.RpcClient`
        """
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
        #: The mutual-TLS side of our listeners (the dashboard may use it too).
        self.server_tls = server
        self._factory.trust_domain = server.trust_domain
        # The proxy talks only to a node's current, unrevoked certificate.
        proxy.peer_check = self.certificate_refusal
        client.use_tls(proxy)
        if tls.ca_key is not None:
            self._load_ca()
            self._enrolling.sign = self._sign
        if tls.listen is not None:
            listeners.add_tls(tls.listen, server, self._reactor)
        self._previous_hangup = signal.signal(
            signal.SIGHUP, lambda *_: self._reactor.callFromThread(self.reload)
        )

    def _load_ca(self):
        try:
            with open(self._tls.ca, "rb") as f:
                cert_pem = f.read()
            with open(self._tls.ca_key, "rb") as f:
                key_pem = f.read()
            self._ca = pki.CertificateAuthority.from_pem(cert_pem, key_pem)
        except (OSError, pki.PkiError) as e:
            raise StartupError(
                f"cannot use the CA key {self._tls.ca_key}: {e} (EXPLORER_CA_KEY)"
            ) from None
        self._ca_pem = cert_pem.decode("ascii")

    def reload(self):
        """Read the TLS files again (after renewal, or new files and SIGHUP)."""
        for creator in self._creators:
            try:
                creator.reload()
            except TLSConfigError as e:
                log.error(
                    "TLS material not reloaded, the old one stays in use: {error}", error=e
                )
                return
        log.info("TLS material reloaded")

    def close(self, last_seen):
        """
        Flush the last heartbeat times and close the state file.

        :param last_seen: node id -> last heartbeat time
        """
        if self._previous_hangup is not None:
            signal.signal(signal.SIGHUP, self._previous_hangup)
            self._previous_hangup = None
        if self._flusher is not None and self._flusher.active():
            self._flusher.cancel()
        self._flusher = None
        if self._pool is not None:
            # Lets what is queued finish first: nothing acknowledged is dropped.
            self._pool.stop()
            self._pool = None
        while self._dirty and self.store is not None:
            if not self._write(self._take()):
                break
        if self.store is not None:
            try:
                self.store.touch_nodes(last_seen)
            except StoreUnavailable:
                log.warn("state store down at shutdown: last heartbeat times not kept")
            finally:
                self.store.close()
                self.store = None

    # -- what the methods need ------------------------------------------------------

    def check_node(self, node_id, secret, context):
        """
        Refuse a heartbeat or leave that neither the node's certificate nor its secret
        speaks for.

        :param context: the call's :class:`~hero_compute.rpc.dispatch.CallContext`
        """
        identity = context.identity
        if identity is not None and identity.role == "node":
            serial, not_before = context.serial, context.not_before
        else:
            serial, not_before = None, None
        if self._pool is not None and secret is not None and serial is None:
            known = self.store.identity(node_id)
            if known is None or known.secret_sha256 is None:
                # First sight of a secret: it is bound in the shared store, on the
                # store's thread; the answer waits for it (or -32007), the reactor not.
                return self.run_on_store(self._enrollment.check_node, node_id, secret)
        self._enrollment.check_node(node_id, secret, serial, not_before)
        return None

    def save_node(self, record):
        """
        Keep a node's record (first sight, or a durable field changed): written with
        the others of the same second in one transaction (:meth:`flush`).  A crash loses
        at most that second of records, which their nodes' next heartbeats restore;
        identities are never deferred.
        """
        self._dirty[record.node_id] = record
        if self._flusher is None:
            self._flusher = self._clock.callLater(FLUSH_EVERY, self.flush)

    def flush(self):
        """
        Write up to :data:`FLUSH_CHUNK` of the records kept since the last flush, and
        the rest a reactor turn later; never raises.  To a shared store the write runs
        on the store's thread; records it could not write are kept for the next flush.
        """
        self._flusher = None
        if not self._dirty or self.store is None:
            return
        records = self._take()
        if self._pool is None:
            if self._dirty:
                self._flusher = self._clock.callLater(0, self.flush)
            self._write(records)
            return
        d = self.run_on_store(self._write, records)
        d.addCallback(self._written, records)

    def _written(self, ok, records):
        if not ok:
            for record in records:
                # A newer record taken since wins over the one that failed.
                self._dirty.setdefault(record["node_id"], NodeRecord(**record))
        if self._dirty and self._flusher is None and self.store is not None:
            self._flusher = self._clock.callLater(0 if ok else FLUSH_EVERY, self.flush)

    def _take(self):
        ids = list(itertools.islice(self._dirty, FLUSH_CHUNK))
        # Not recursing: the store serialises the dicts in a record itself.
        return [attrs.asdict(self._dirty.pop(i), recurse=False) for i in ids]

    def _write(self, records):
        try:
            self.store.save_nodes(records)
        except StoreUnavailable:
            return False
        except Exception:
            log.failure("could not keep {count} node records", count=len(records))
        return True

    def forget_record(self, node_id):
        """Drop a forgotten node's stored record; its identity binding stays."""
        self._dirty.pop(node_id, None)
        if self.store is not None:
            d = self.run_on_store(self.store.forget_node, node_id)
            if d is not None:
                # The next flush or heartbeat settles it; nothing waits on this one.
                d.addErrback(lambda f: f.trap(StoreUnavailable))

    def forget_node(self, node_id):
        """
        Forget a removed node's record and identity binding (not a revocation).

        :return: None, or a Deferred when the store is shared
        """
        self._dirty.pop(node_id, None)
        return self.run_on_store(self._forget, node_id)

    def _forget(self, node_id):
        self.store.forget_identity(node_id)
        self.store.forget_node(node_id)

    def revoke(self, node_id):
        """``explorer.revoke``: refuse the node's certificates and secret from now on."""
        return self.run_on_store(self._enrollment.revoke, node_id)

    def create_token(self, ttl=None, node_id=None):
        """``explorer.create_token``: a single-use join token."""
        return self.run_on_store(
            self._enrollment.create_token, DEFAULT_TTL if ttl is None else ttl, node_id
        )

    def enroll(self, token, csr, registered=lambda node_id: False):
        """
        ``explorer.enroll``: a token and a CSR for the node's certificate.

        :param registered: ``registered(node_id)``: whether the registry holds the id
        """
        node_id = csr_node_id(csr)
        return self.run_on_store(self._enroll, token, csr, node_id, registered(node_id))

    def _enroll(self, token, csr, node_id, registered):
        certificate = self._enrollment.enroll(token, csr, node_id, registered)
        return {"certificate": certificate, "ca": self._ca_pem}

    def renew(self, context, csr):
        """``explorer.renew``: a new certificate for the node whose certificate calls."""
        identity = context.identity
        if identity is None or identity.role != "node" or context.serial is None:
            # The roles table lets no other caller here; should one ever be let in,
            # it is a refusal, not an internal error.
            raise RefusedByPolicy("explorer.renew needs the node's own certificate")
        return self.run_on_store(
            self._renew, identity.name, context.serial, csr, context.not_before
        )

    def _renew(self, name, serial, csr, not_before):
        return {"certificate": self._enrollment.renew(name, serial, csr, not_before)}

    def certificate_refusal(self, identity, serial, not_before):
        """
        The proxy's check of a node's TLS certificate, before anything is sent.

        :param identity: the :class:`~hero_compute.rpc.tls.PeerIdentity` it names
        :return: why the explorer must not talk to that peer, or None
        """
        if identity.role != "node" or self._enrollment is None:
            return None
        return self._enrollment.certificate_refusal(identity.name, serial, not_before)

    def _sign(self, csr_pem, node_id):
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


def _utc(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)
