"""
What a node's heartbeat says (:class:`HeartbeatPayload`) and which of the node's
addresses it gives each explorer (:class:`Advertiser`); :mod:`.heartbeat` sends it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure

import hero_compute
from hero_compute.rpc.addresses import Address, ListenAddress
from hero_compute.rpc.interfaces import IRpcClient

from .vms import IVmManager

if TYPE_CHECKING:
    from hero_compute.rpc.listeners import Listeners


class _Identity(Protocol):
    """What a heartbeat reads of the node's identity (node/service.py's NodeIdentity)."""

    node_id: str | None
    name: str
    secret: str | None
    labels: dict


@attrs.define
class Advertiser:
    """
    Chooses the address a node reports to each explorer: its Unix socket to an explorer
    reached over Unix, its TCP address to one reached over TCP, its TLS address to one
    reached over TLS.  The host of a TCP or TLS address is that of the configured
    advertise address, or the node's own IP on its connection to that explorer; the port
    is that of the listener of the same kind (an advertise address of that very scheme is
    reported as it is).

    :ivar _unix: the node's Unix :class:`Address`
    :ivar _client: an :class:`~hero_compute.rpc.interfaces.IRpcClient`, to learn the
        node's own end of a connection to an explorer
    :ivar _listeners: the node's :class:`~hero_compute.rpc.listeners.Listeners`, whose
        bound URIs give the ports actually bound (port 0 in tests)
    :ivar _tcp: the :class:`~hero_compute.rpc.addresses.ListenAddress` of the TCP
        listener, or None
    :ivar _advertise: a ``tcp://`` or ``tls://`` :class:`Address` whose host is reported
        to remote explorers, or None to derive it
    :ivar _tls: the :class:`~hero_compute.rpc.addresses.ListenAddress` of the TLS
        listener, or None
    """

    _unix: Address
    _client: IRpcClient
    _listeners: Listeners
    _tcp: ListenAddress | None = None
    _advertise: Address | None = None
    _tls: ListenAddress | None = None

    def address_for(self, explorer: Address) -> defer.Deferred[Address]:
        """
        :param explorer: the explorer's :class:`Address`
        :return: a Deferred of the :class:`Address` to report to it; it fails, never
            raises
        """
        return defer.maybeDeferred(self._address_for, explorer)

    def _address_for(self, explorer):
        if explorer.is_unix:
            return self._unix
        # To a tls:// explorer, our TLS listener: the explorer proxies over TLS and checks
        # that our certificate names the node it calls.
        scheme = "tls" if explorer.scheme == "tls" else "tcp"
        if self._advertise is not None:
            if self._advertise.scheme == scheme:
                return self._advertise
            return Address(scheme, host=self._advertise.host, port=self.port(scheme))
        port = self.port(scheme)
        # Our address on the very connection the heartbeat will travel: right with
        # several interfaces, policy routing, IPv6-only names, and whichever address
        # of a name the connection ended up using.
        # Bounded by the heartbeat attempt it is part of.
        d = self._client.local_host(explorer)
        d.addCallback(lambda ip: Address(scheme, host=ip, port=port))
        return d

    def port(self, scheme: str) -> int:
        """:return: the bound port of the node's ``tcp`` or ``tls`` listener"""
        for uri in self._listeners.bound:
            if uri.startswith(scheme + "://"):
                return int(uri.rsplit(":", 1)[1])
        listen = self._tls if scheme == "tls" else self._tcp
        if listen is None:
            # As before the check: the heartbeat to that explorer fails with it.
            raise AttributeError(f"this node has no {scheme} listener")
        return listen.port

    def tcp_port(self) -> int:
        """:return: the bound port of the node's TCP listener"""
        return self.port("tcp")


def _first_failure(failure: Failure) -> Failure:
    """The failure inside a :class:`~twisted.internet.defer.FirstError`, or itself."""
    if failure.check(defer.FirstError):
        return cast(defer.FirstError, failure.value).subFailure
    return failure


@attrs.define
class HeartbeatPayload:
    """
    Builds the params of a heartbeat to one explorer.

    :ivar _identity: the node's identity (``node_id``, ``name``, ``secret`` and
        ``labels``), read at
        each heartbeat: they are known only once the node has started
    :ivar _advertiser: the :class:`Advertiser`
    :ivar _vms: the node's :class:`~hero_compute.node.vms.IVmManager`
    """

    _identity: _Identity
    _advertiser: Advertiser
    _vms: IVmManager

    def params(self, explorer: Address) -> defer.Deferred[dict[str, Any]]:
        """
        :param explorer: the explorer's :class:`Address`
        :return: a Deferred of the params dict of ``explorer.heartbeat``
        """
        parts: list[defer.Deferred[Any]] = [
            self._advertiser.address_for(explorer),
            defer.maybeDeferred(self._vms.list),
        ]
        d = defer.gatherResults(parts, consumeErrors=True)

        def params(results: list[Any]) -> dict[str, Any]:
            address, vms = results
            result = {
                "node_id": self._identity.node_id,
                "socket_path": address.uri,
                "name": self._identity.name,
                "version": hero_compute.__version__,
                "capacity": self._vms.capacity(),
                "usage": self._vms.usage(),
                "vm_count": len(vms),
                # In every full heartbeat; a delta leaves them out while unchanged
                # and the explorer keeps them.
                "labels": self._identity.labels,
            }
            if self._identity.secret is not None:
                # On every transport, TLS included: it binds the node id (CONTRACT §6).
                result["secret"] = self._identity.secret
            return result

        d.addErrback(_first_failure)
        return d.addCallback(params)
