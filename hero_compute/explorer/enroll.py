"""
Join tokens and the explorer's trust decisions about nodes: who may enroll, renew, and
heartbeat as which node id.  Independent of X.509: signing a CSR is injected as a
callable ``sign(csr_pem, node_id) -> (cert_pem, serial)``, and the transport layer hands
in what it verified of a peer's certificate (node id and serial).  The tokens, secrets
and ids themselves, made, hashed and checked, are :mod:`.credentials`'.

Decisions, and why:

- :meth:`Enrollment.enroll` checks everything it can *before* using the token up (the
  token names another node id, the id is taken), so a misconfigured ``NODE_ID`` can be
  fixed and the same token retried: a retry gives its holder nothing the first try would
  not have.  It then redeems the token (atomically, single use) and only *then* signs, so
  one token can never produce two certificates; if signing fails the token is spent and
  the operator makes another.
- A token naming no node id enrolls only *new* ids: an id the explorer knows in any way
  (a node record, in the registry or kept on disk, a secret binding, an enrollment, a
  revocation, a certificate it signed) needs a token created for it (``token create
  --node-id ID``).  Taking over a name in use, or lifting a revocation, is an operator's
  explicit act.  Re-enrolling revokes the id's earlier certificates.
- Revocation outlives re-enrollment and removal: revoked serials stay refused, and
  revoking an id refuses every certificate for it issued before then (``not_valid_before``
  earlier than the revocation), those made offline included, except the ones this
  explorer signed after it.
- Every token failure reads "invalid or expired token", whether the token never existed,
  was used, or expired.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hero_compute.explorer.store import IStore, TokenRefused
from hero_compute.rpc.errors import RefusedByPolicy

from .credentials import (
    DEFAULT_TTL,
    TOKEN_PATTERN,
    check_node_id,
    check_ttl,
    hash_secret,
    hash_token,
    new_token,
)

log = Logger()

INVALID_TOKEN = "invalid or expired token"

#: ``sign(csr_pem, node_id) -> (certificate PEM, serial)``: the fleet CA's signature on
#: a node's CSR, for the node id the explorer decided.
Signer = Callable[[str, str], tuple[str, int]]


@attrs.define
class Enrollment:
    """
    Tokens, enrollment, renewal, revocation, and the check of a node's credentials.

    The methods are synchronous and never yield to the reactor between a check and the
    change it guards, so in one explorer no two calls interleave; the store's
    transactions cover anything beyond that.

    :ivar store: the :class:`~hero_compute.explorer.store.IStore`
    :ivar clock: an ``IReactorTime``; ``seconds()`` is Unix time
    :ivar sign: a :data:`Signer`, or ``None`` when this explorer has no CA key
        (enrollment and renewal are then refused)
    """

    store: IStore
    clock: IReactorTime
    sign: Signer | None = None

    def create_token(
        self, ttl: float = DEFAULT_TTL, node_id: str | None = None
    ) -> dict[str, Any]:
        """
        Make a single-use join token.

        :param ttl: seconds it stays valid
        :param node_id: the only node id it may enroll, or ``None`` for any new id
        :raises InvalidParams: bad ``ttl`` or ``node_id``
        :return: ``{"token": str, "expires_at": float}``; the token itself is not kept
        """
        check_ttl(ttl)
        if node_id is not None:
            check_node_id(node_id)
        token = new_token()
        expires_at = self.clock.seconds() + ttl
        self.store.add_token(hash_token(token), node_id, expires_at)
        log.info(
            "join token created for {who}, valid {ttl} s",
            who="any new node" if node_id is None else f"node {node_id}",
            ttl=ttl,
        )
        return {"token": token, "expires_at": expires_at}

    def _signer(self) -> Signer:
        if self.sign is None:
            raise RefusedByPolicy(
                "this explorer does not sign certificates: it has no "
                "CA key (set EXPLORER_CA_KEY)"
            )
        return self.sign

    def enroll(
        self, token: str, csr_pem: str, csr_node_id: str, registered: bool = False
    ) -> str:
        """
        Enroll a node: check the token and the id, use the token up, sign the CSR.

        :param token: the join token, as the node sent it
        :param csr_pem: the node's CSR
        :param csr_node_id: the node id the CSR asks for (read from it by the caller)
        :param registered: whether the registry (in memory) holds a record of the id
        :raises RefusedByPolicy: no CA key; the token is invalid, used or expired; it
            names another id; or the id is known (see :meth:`Store.knows`, and
            ``registered``) and the token does not name it
        :raises InvalidParams: ``csr_node_id`` is not a valid node id
        :return: the certificate, PEM
        """
        sign = self._signer()
        check_node_id(csr_node_id)
        if not isinstance(token, str) or not TOKEN_PATTERN.fullmatch(token):
            raise RefusedByPolicy(INVALID_TOKEN)
        token_hash, now = hash_token(token), self.clock.seconds()
        try:
            allowed = self.store.peek_token(token_hash, now)
        except TokenRefused:
            raise RefusedByPolicy(INVALID_TOKEN) from None
        if allowed is not None and allowed != csr_node_id:
            raise RefusedByPolicy(f"this token does not allow node id {csr_node_id!r}")
        if allowed is None and (registered or self.store.knows(csr_node_id)):
            identity = self.store.identity(csr_node_id)
            state = (
                "revoked"
                if identity is not None and identity.revoked
                else "already enrolled"
                if identity is not None and identity.enrolled
                else "known to this explorer"
            )
            raise RefusedByPolicy(
                f"node id {csr_node_id!r} is {state}; enrolling it needs a token "
                f"created for it (hero-compute token create --node-id {csr_node_id})"
            )
        try:
            self.store.redeem_token(token_hash, now)
        except TokenRefused:
            raise RefusedByPolicy(INVALID_TOKEN) from None
        cert_pem, serial = sign(csr_pem, csr_node_id)
        self.store.mark_enrolled(csr_node_id, serial, now)
        log.info(
            "node {node_id} enrolled (certificate serial {serial:x})",
            node_id=csr_node_id,
            serial=serial,
        )
        return cert_pem

    def renew(
        self,
        node_id: str,
        cert_serial: int,
        csr_pem: str,
        not_before: float | None = None,
    ) -> str:
        """
        Renew a node's certificate, authenticated by the current one.

        :param node_id: the node id its verified certificate names
        :param cert_serial: that certificate's serial
        :param csr_pem: the CSR for the new certificate
        :param not_before: that certificate's ``not_valid_before`` (Unix seconds)
        :raises RefusedByPolicy: no CA key; the certificate or the id is revoked; or it
            is not the id's current certificate
        :return: the new certificate, PEM
        """
        sign = self._signer()
        self._refuse_revoked(node_id, cert_serial, not_before)
        identity = self.store.identity(node_id)
        if (
            identity is not None
            and identity.enrolled
            and identity.cert_serial != cert_serial
        ):
            raise RefusedByPolicy(
                f"certificate {cert_serial:x} is not the current one of "
                f"node {node_id!r}; renew with the newest certificate"
            )
        now = self.clock.seconds()
        cert_pem, serial = sign(csr_pem, node_id)
        if not self.store.renew_serial(node_id, cert_serial, serial, now):
            # Another renewal from the same certificate won: the certificate just signed
            # must never become a second valid one for this id.
            self.store.revoke_serial(serial, node_id, now)
            raise RefusedByPolicy(
                f"certificate {cert_serial:x} of node {node_id!r} was "
                f"renewed meanwhile; renew with the newest certificate"
            )
        log.info(
            "node {node_id} renewed its certificate (serial {old:x} -> {new:x})",
            node_id=node_id,
            old=cert_serial,
            new=serial,
        )
        return cert_pem

    def revoke(self, node_id: str) -> None:
        """
        Refuse a node id's certificates and secret from now on, until it enrolls again
        with a token created for it.  An id never seen can be revoked too: it then
        cannot join at all until such an enrollment.

        :raises InvalidParams: ``node_id`` is not a valid node id
        """
        check_node_id(node_id)
        self.store.revoke(node_id, self.clock.seconds())
        log.info("node {node_id} revoked", node_id=node_id)

    def _refuse_revoked(
        self, node_id: str, cert_serial: int, not_before: float | None
    ) -> None:
        reason = self._revoked(node_id, cert_serial, not_before)
        if reason is not None:
            raise RefusedByPolicy(reason)

    def _revoked(
        self, node_id: str, cert_serial: int, not_before: float | None
    ) -> str | None:
        """:return: why the certificate is revoked, or None"""
        identity = self.store.identity(node_id)
        if identity is not None and identity.revoked:
            return f"node {node_id!r} is revoked; it must enroll again with a new token"
        if self.store.is_revoked_serial(cert_serial):
            return f"certificate {cert_serial:x} of node {node_id!r} is revoked"
        revoked_at = self.store.id_revoked_at(node_id)
        # A certificate whose issue time is unknown counts as issued before.
        if revoked_at is not None and (not_before is None or not_before < revoked_at):
            issued = self.store.issued_at(cert_serial)
            if issued is None or issued < revoked_at:
                return (
                    f"certificate {cert_serial:x} of node {node_id!r} was issued "
                    f"before the node was revoked"
                )
        return None

    def certificate_refusal(
        self, node_id: str, cert_serial: int, not_before: float | None
    ) -> str | None:
        """
        Whether the explorer's proxy may talk to a peer presenting this ``node/<id>``
        certificate: only the id's current one, never a revoked or superseded one.

        :param not_before: the certificate's ``not_valid_before`` (Unix seconds)
        :return: why not, or None when it may
        """
        reason = self._revoked(node_id, cert_serial, not_before)
        if reason is not None:
            return reason
        identity = self.store.identity(node_id)
        if (
            identity is not None
            and identity.enrolled
            and cert_serial != identity.cert_serial
        ):
            return f"certificate {cert_serial:x} is not the current one of node {node_id!r}"
        return None

    def check_node(
        self,
        node_id: str,
        secret: str | None = None,
        cert_serial: int | None = None,
        not_before: float | None = None,
    ) -> None:
        """
        Decide whether a heartbeat or leave may act for ``node_id``; call it after the
        rate limits, since the first secret seen for an id is written to disk.

        Over TLS (``cert_serial`` given: the transport verified a ``node/<node_id>``
        certificate) the certificate decides: refused if it or the id is revoked, or if
        the id is enrolled and it is neither its current certificate nor the one that
        renewed into it.  A certificate made offline for an id that never enrolled is
        accepted.  Otherwise the node secret decides: refused for an enrolled or revoked
        id; without a secret, accepted only while none is bound; with one, bound on first
        sight and from then on compared.

        :param secret: the node secret as sent (the text), or ``None``
        :param cert_serial: the serial of the peer's verified certificate, or ``None``
            when the call did not come over TLS with a node certificate
        :param not_before: that certificate's ``not_valid_before`` (Unix seconds)
        :raises RefusedByPolicy: when refused, saying why
        """
        identity = self.store.identity(node_id)
        if cert_serial is not None:
            self._refuse_revoked(node_id, cert_serial, not_before)
            if (
                identity is not None
                and identity.enrolled
                and cert_serial not in (identity.cert_serial, identity.previous_serial)
            ):
                raise RefusedByPolicy(
                    f"certificate {cert_serial:x} is superseded for node {node_id!r}"
                )
            return
        if identity is not None and identity.revoked:
            raise RefusedByPolicy(
                f"node {node_id!r} is revoked; it must enroll again with a new token"
            )
        if identity is not None and identity.enrolled:
            raise RefusedByPolicy(
                f"node {node_id!r} has enrolled: it is accepted only "
                f"over TLS with its certificate"
            )
        if secret is None:
            if identity is not None and identity.secret_sha256 is not None:
                raise RefusedByPolicy(
                    f"node {node_id!r} is bound to a secret; this call carries none"
                )
            return
        digest = hash_secret(secret)
        if identity is not None and identity.secret_sha256 is not None:
            # The steady state, on every heartbeat: a comparison in memory, no write.
            if not hmac.compare_digest(identity.secret_sha256, digest):
                raise RefusedByPolicy(f"node {node_id!r} is bound to another secret")
            return
        if not self.store.bind_secret(node_id, digest):
            raise RefusedByPolicy(f"node {node_id!r} is bound to another secret")
