"""
Heartbeats from a node to its explorers: one independent loop per explorer, what each
heartbeat says, and which address it gives.

Each loop is scheduled with ``callLater`` rather than a ``LoopingCall``: the delay after a
tick depends on its outcome (the interval after success, an exponential backoff with
jitter after failure), and a LoopingCall can only re-align to a fixed interval grid.  A
tick returns only after its call finished or timed out, so ticks never overlap, and it
catches its own failures, so the loop lives until stopped.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Protocol, cast

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

import hero_compute
from hero_compute.rpc.addresses import Address, ListenAddress
from hero_compute.rpc.errors import RpcError, TransportError
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


log = Logger()

#: A backoff never waits longer than this, whatever the interval.
MAX_BACKOFF = 60.0

#: An attempt is bounded by the interval, and by this however long the interval.
MAX_ATTEMPT = 10.0

#: Params every heartbeat carries, changed or not; the others a delta heartbeat leaves
#: out when unchanged since the last accepted one.
ALWAYS_SENT = frozenset({"node_id", "socket_path", "secret"})


def delta(params, accepted, session):
    """
    The delta heartbeat for ``params``: what changed since ``accepted`` (the params of
    the last accepted heartbeat) and the explorer's ``session``; or ``params`` itself
    when a delta cannot say it (no session, or a param has come or gone).

    :param params: the full heartbeat params
    :param accepted: the last accepted full params, or None
    :param session: the ``session`` of the explorer's last answer, or None
    """
    if session is None or accepted is None or params.keys() != accepted.keys():
        return params
    changed = {
        key: value
        for key, value in params.items()
        if key in ALWAYS_SENT or accepted[key] != value
    }
    changed["session"] = session
    return changed


def backoff_delay(interval, failures, rand=random.random):
    """
    Seconds to wait after the ``failures``-th consecutive failure: exponential, capped at
    5 × interval and at :data:`MAX_BACKOFF`, with jitter so a fleet that lost its explorer
    does not come back in lockstep.

    :param interval: the heartbeat interval
    :param failures: consecutive failures so far (1 after the first)
    :param rand: source of uniform numbers in [0, 1)
    """
    cap = min(5 * interval, MAX_BACKOFF)
    base = min(cap, interval * 2 ** min(failures - 1, 30))
    # Equal jitter: between half and all of the step, so the delay still grows.
    return base / 2 + base / 2 * rand()


@attrs.frozen
class ExplorerState:
    """
    How heartbeats to one explorer are going, as shown by ``node.info``.

    :ivar state: ``"ok"`` or ``"failing"``
    :ivar last_ok: Unix seconds of the last accepted heartbeat, or None
    :ivar last_error: the last failure, or None
    """

    address: str
    state: str = "failing"
    last_ok: float | None = None
    last_error: str | None = None
    failures: int = 0

    def to_wire(self):
        """:return: the dict of ``node.info``'s ``explorers``"""
        return {
            "address": self.address,
            "state": self.state,
            "last_ok": self.last_ok,
            "last_error": self.last_error,
        }


class HeartbeatLoop(service.Service):
    """
    Heartbeats one explorer, every ``interval`` seconds while it answers, backing off
    while it does not.

    :param clock: an ``IReactorTime``
    :param client: an :class:`~hero_compute.rpc.interfaces.IRpcClient`
    :param address: the explorer's :class:`Address`
    :param payload: a callable returning a Deferred of the heartbeat params for this
        explorer (:meth:`HeartbeatPayload.params`)
    :param interval: seconds between heartbeats
    :param rand: source of uniform numbers in [0, 1), for jitter
    """

    def __init__(self, clock, client, address, payload, interval, rand=random.random):
        self.clock = clock
        self._client = client
        self.address = address
        self._payload = payload
        self.interval = interval
        self._attempt_timeout = min(interval, MAX_ATTEMPT)
        self._rand = rand
        self.state = ExplorerState(address.uri)
        self._call = None
        self._tick = None
        # The explorer's session and the params it last accepted, for delta heartbeats
        # (steady heartbeats then carry only what changed).
        self._session = None
        self._accepted = None

    def startService(self):
        service.Service.startService(self)
        self._schedule(0)

    def stopService(self):
        service.Service.stopService(self)
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._tick is not None:
            self._tick.cancel()

    def _schedule(self, delay):
        if self.running:
            self._call = self.clock.callLater(delay, self.beat)

    def beat(self):
        """
        Send one heartbeat and schedule the next; never fails.  Called out of schedule
        (between ticks), it replaces the heartbeat that was due.

        :return: a Deferred firing when this tick is over
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        started = self.clock.seconds()
        timeout = self._attempt_timeout
        d = defer.maybeDeferred(self._payload, self.address)
        d.addCallback(self._send, timeout)
        # The whole attempt, building the payload included (for a TCP explorer it
        # connects first, to learn our own address), is bounded by the interval.
        d.addTimeout(timeout, self.clock)
        d.addCallbacks(self._succeeded, self._failed, errbackArgs=(started,))
        d.addErrback(lambda f: log.failure("heartbeat bookkeeping failed", f))
        d.addBoth(lambda _: self._done(started))
        self._tick = d
        return d

    def _send(self, params, timeout):
        body = delta(params, self._accepted, self._session)
        d = self._client.call(self.address, "explorer.heartbeat", body, timeout=timeout)
        if body is not params:
            # The explorer may no longer hold our record (it restarted, or forgot us):
            # whatever it says against a delta, the full heartbeat follows at once.
            d.addErrback(self._resend_full, params, timeout)
        d.addCallback(self._accepted_with, params)
        return d

    def _resend_full(self, failure, params, timeout):
        failure.trap(RpcError)
        self._session = self._accepted = None
        return self._client.call(
            self.address, "explorer.heartbeat", params, timeout=timeout
        )

    def _accepted_with(self, result, params):
        session = result.get("session") if isinstance(result, dict) else None
        self._session = session if isinstance(session, str) else None
        self._accepted = params
        return result

    def _succeeded(self, result):
        if self.state.state != "ok":
            log.info("explorer {address}: heartbeats accepted", address=self.address.uri)
            expected = result.get("next_heartbeat") if isinstance(result, dict) else None
            if isinstance(expected, (int, float)) and expected < self.interval:
                # The explorer declares us offline after about 3 × next_heartbeat: with a
                # longer interval this node would flap between online and offline.
                log.warn(
                    "explorer {address} expects a heartbeat every {expected:g} s but "
                    "HEARTBEAT_INTERVAL is {interval:g} s: lower it, or raise the "
                    "explorer's NODE_OFFLINE_AFTER",
                    address=self.address.uri,
                    expected=expected,
                    interval=self.interval,
                )
        self.state = attrs.evolve(
            self.state,
            state="ok",
            last_ok=self.clock.seconds(),
            last_error=None,
            failures=0,
        )

    def _failed(self, failure, started):
        # Whatever happened, the next heartbeat is a full one.
        self._session = self._accepted = None
        if failure.check(defer.CancelledError):
            return
        first = self.state.state == "ok" or self.state.failures == 0
        if failure.check(defer.TimeoutError):
            reason = f"no answer within {self._attempt_timeout:g} s"
        elif failure.check(RpcError, TransportError):
            reason = str(failure.value)
        else:
            reason = f"{failure.type.__name__}: {failure.getErrorMessage()}"
            if first:
                log.failure(
                    "heartbeat to {address} failed unexpectedly",
                    failure,
                    address=self.address.uri,
                )
        if first:
            # Said once per transition, not at every retry.
            log.warn(
                "explorer {address}: heartbeat failing: {reason}",
                address=self.address.uri,
                reason=reason,
            )
        self.state = attrs.evolve(
            self.state, state="failing", last_error=reason, failures=self.state.failures + 1
        )

    def _done(self, started):
        self._tick = None
        if self.state.state == "ok":
            delay = max(0.0, self.interval - (self.clock.seconds() - started))
        else:
            delay = backoff_delay(self.interval, self.state.failures, self._rand)
        self._schedule(delay)


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

    def address_for(self, explorer):
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

    def port(self, scheme):
        """:return: the bound port of the node's ``tcp`` or ``tls`` listener"""
        for uri in self._listeners.bound:
            if uri.startswith(scheme + "://"):
                return int(uri.rsplit(":", 1)[1])
        listen = self._tls if scheme == "tls" else self._tcp
        if listen is None:
            # As before the check: the heartbeat to that explorer fails with it.
            raise AttributeError(f"this node has no {scheme} listener")
        return listen.port

    def tcp_port(self):
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

    def params(self, explorer):
        """
        :param explorer: the explorer's :class:`Address`
        :return: a Deferred of the params dict of ``explorer.heartbeat``
        """
        d = defer.gatherResults(
            [
                self._advertiser.address_for(explorer),
                defer.maybeDeferred(self._vms.list),
            ],
            consumeErrors=True,
        )

        def params(results):
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
