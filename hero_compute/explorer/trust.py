"""
The explorer's side of fleet trust (CONTRACT §6), over its state store
(:mod:`.state`): identities, tokens and certificates (:mod:`.enroll`), behind the
methods that need them.  The TLS material and the CA that signs are
:mod:`.tls_material`'s.

The handlers here are what is left once the roles table has let a call through: they
decide per node (is this the node's secret, its current certificate?), never per role.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from hero_compute.rpc.context import CallContext
from hero_compute.rpc.errors import RefusedByPolicy
from hero_compute.rpc.tls_peer import PeerIdentity

from .credentials import DEFAULT_TTL, csr_node_id
from .enroll import Enrollment, Signer
from .store import IStore

if TYPE_CHECKING:
    from .state import ExplorerState

_P = ParamSpec("_P")
_T = TypeVar("_T")


class ExplorerTrust(service.Service):
    """
    Identities, tokens and certificates, behind the methods that need them; started
    once the state store is open.

    :param clock: ``IReactorTime`` (Unix seconds)
    :param state: the :class:`~hero_compute.explorer.state.ExplorerState`
    """

    def __init__(self, *, clock: IReactorTime, state: ExplorerState) -> None:
        self._clock = clock
        self._state = state
        self._enrollment: Enrollment | None = None
        self._ca_pem: str | None = None

    def privilegedStartService(self) -> None:
        self._open()
        service.Service.privilegedStartService(self)

    def startService(self) -> None:
        self._open()
        service.Service.startService(self)

    def _open(self) -> None:
        # Once per store: a restart opens a new one.
        if self._enrollment is None or self._enrollment.store is not self._state.store:
            # No signer until the CA key is loaded: without one, enrollment is refused
            # before a token is looked at, so no token is used up for nothing.
            self._enrollment = Enrollment(self._state.store, self._clock)

    def _opened(self) -> Enrollment:
        """The enrollment over the open store: what runs here runs once started."""
        assert self._enrollment is not None
        return self._enrollment

    def use_signer(self, sign: Signer, ca_pem: str) -> None:
        """
        Sign enrollments and renewals from now on (the CA key is loaded).

        :param sign: ``sign(csr_pem, node_id)`` -> ``(certificate PEM, serial)``
        :param ca_pem: the CA certificate, handed to enrolling nodes
        """
        self._ca_pem = ca_pem
        self._opened().sign = sign

    @property
    def store(self) -> IStore | None:
        """The open state store, or None."""
        return self._state.store

    def _open_store(self) -> IStore:
        store = self._state.store
        assert store is not None  # called only once started
        return store

    def run_on_store(
        self, f: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T | defer.Deferred[_T]:
        """Run a store call as :meth:`ExplorerState.run_on_store` does."""
        return self._state.run_on_store(f, *args, **kwargs)

    # -- what the methods need ------------------------------------------------------

    def check_node(
        self, node_id: str, secret: str | None, context: CallContext
    ) -> defer.Deferred[None] | None:
        """
        Refuse a heartbeat or leave that neither the node's certificate nor its secret
        speaks for.

        :param context: the call's :class:`~hero_compute.rpc.dispatch.CallContext`
        """
        # On every heartbeat: the enrollment read inline, not through _opened().
        enrollment = self._enrollment
        assert enrollment is not None
        identity = context.identity
        if identity is not None and identity.role == "node":
            serial, not_before = context.serial, context.not_before
        else:
            serial, not_before = None, None
        if self._state.shared and secret is not None and serial is None:
            known = self._open_store().identity(node_id)
            if known is None or known.secret_sha256 is None:
                # First sight of a secret: it is bound in the shared store, on the
                # store's thread; the answer waits for it (or -32007), the reactor not.
                return self.run_on_store(enrollment.check_node, node_id, secret)
        enrollment.check_node(node_id, secret, serial, not_before)
        return None

    def forget_node(self, node_id: str) -> defer.Deferred[None] | None:
        """
        Forget a removed node's record and identity binding (not a revocation).

        :return: None, or a Deferred when the store is shared
        """
        self._state.records.drop(node_id)
        return self.run_on_store(self._forget, node_id)

    def _forget(self, node_id: str) -> None:
        store = self._open_store()
        store.forget_identity(node_id)
        store.forget_node(node_id)

    def revoke(self, node_id: str) -> defer.Deferred[None] | None:
        """``explorer.revoke``: refuse the node's certificates and secret from now on."""
        return self.run_on_store(self._opened().revoke, node_id)

    def create_token(
        self, ttl: float | None = None, node_id: str | None = None
    ) -> dict[str, Any] | defer.Deferred[dict[str, Any]]:
        """``explorer.create_token``: a single-use join token."""
        return self.run_on_store(
            self._opened().create_token, DEFAULT_TTL if ttl is None else ttl, node_id
        )

    def enroll(
        self,
        token: str,
        csr: str,
        registered: Callable[[str], bool] = lambda node_id: False,
    ) -> dict[str, Any] | defer.Deferred[dict[str, Any]]:
        """
        ``explorer.enroll``: a token and a CSR for the node's certificate.

        :param registered: ``registered(node_id)``: whether the registry holds the id
        """
        node_id = csr_node_id(csr)
        return self.run_on_store(self._enroll, token, csr, node_id, registered(node_id))

    def _enroll(
        self, token: str, csr: str, node_id: str, registered: bool
    ) -> dict[str, Any]:
        certificate = self._opened().enroll(token, csr, node_id, registered)
        return {"certificate": certificate, "ca": self._ca_pem}

    def renew(
        self, context: CallContext, csr: str
    ) -> dict[str, Any] | defer.Deferred[dict[str, Any]]:
        """``explorer.renew``: a new certificate for the node whose certificate calls."""
        identity = context.identity
        if identity is None or identity.role != "node" or context.serial is None:
            # The roles table lets no other caller here; should one ever be let in,
            # it is a refusal, not an internal error.
            raise RefusedByPolicy("explorer.renew needs the node's own certificate")
        return self.run_on_store(
            self._renew, identity.name, context.serial, csr, context.not_before
        )

    def _renew(
        self, name: str, serial: int, csr: str, not_before: float | None
    ) -> dict[str, Any]:
        return {"certificate": self._opened().renew(name, serial, csr, not_before)}

    def certificate_refusal(
        self, identity: PeerIdentity, serial: int, not_before: float
    ) -> str | None:
        """
        The proxy's check of a node's TLS certificate, before anything is sent.

        :param identity: the :class:`~hero_compute.rpc.tls.PeerIdentity` it names
        :return: why the explorer must not talk to that peer, or None
        """
        if identity.role != "node" or self._enrollment is None:
            return None
        return self._enrollment.certificate_refusal(identity.name, serial, not_before)
