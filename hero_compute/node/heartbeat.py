"""
Heartbeats from a node to its explorers: one independent loop per explorer (what each
heartbeat says, and which address it gives, is :mod:`.advertise`).

Each loop is scheduled with ``callLater`` rather than a ``LoopingCall``: the delay after a
tick depends on its outcome (the interval after success, an exponential backoff with
jitter after failure), and a LoopingCall can only re-align to a fixed interval grid.  A
tick returns only after its call finished or timed out, so ticks never overlap, and it
catches its own failures, so the loop lives until stopped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from hero_compute.rpc.backoff import retry_delay
from hero_compute.rpc.errors import RpcError, TransportError

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from hero_compute.rpc.addresses import Address
    from hero_compute.rpc.interfaces import IRpcClient


log = Logger()

#: A backoff never waits longer than this, whatever the interval.
MAX_BACKOFF = 60.0

#: An attempt is bounded by the interval, and by this however long the interval.
MAX_ATTEMPT = 10.0

#: Params every heartbeat carries, changed or not; the others a delta heartbeat leaves
#: out when unchanged since the last accepted one.
ALWAYS_SENT = frozenset({"node_id", "socket_path", "secret"})


def delta(
    params: dict[str, Any], accepted: dict[str, Any] | None, session: str | None
) -> dict[str, Any]:
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


def backoff_delay(
    interval: float, failures: int, rand: Callable[[], float] = random.random
) -> float:
    """
    Seconds to wait after the ``failures``-th consecutive failure: exponential from
    ``interval``, capped at 5 × interval and at :data:`MAX_BACKOFF`, with equal jitter
    (:func:`~hero_compute.rpc.backoff.retry_delay`) so a fleet that lost its explorer
    does not come back in lockstep.

    :param interval: the heartbeat interval
    :param failures: consecutive failures so far (1 after the first)
    :param rand: source of uniform numbers in [0, 1)
    """
    return retry_delay(failures, interval, min(5 * interval, MAX_BACKOFF), rand)


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

    def to_wire(self) -> dict[str, Any]:
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

    def __init__(
        self,
        clock: IReactorTime,
        client: IRpcClient,
        address: Address,
        payload: Callable[[Address], defer.Deferred[dict[str, Any]]],
        interval: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.clock = clock
        self._client = client
        self.address = address
        self._payload = payload
        self.interval = interval
        self._attempt_timeout = min(interval, MAX_ATTEMPT)
        self._rand = rand
        self.state = ExplorerState(address.uri)
        self._call: IDelayedCall | None = None
        self._tick: defer.Deferred[Any] | None = None
        # The explorer's session and the params it last accepted, for delta heartbeats
        # (steady heartbeats then carry only what changed).
        self._session: str | None = None
        self._accepted = None

    def startService(self) -> None:
        service.Service.startService(self)
        self._schedule(0)

    def stopService(self) -> None:
        service.Service.stopService(self)
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._tick is not None:
            self._tick.cancel()

    def _schedule(self, delay) -> None:
        if self.running:
            self._call = self.clock.callLater(delay, self.beat)

    def beat(self) -> defer.Deferred[Any]:
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

    def _succeeded(self, result) -> None:
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

    def _failed(self, failure, started) -> None:
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

    def _done(self, started) -> None:
        self._tick = None
        if self.state.state == "ok":
            delay = max(0.0, self.interval - (self.clock.seconds() - started))
        else:
            delay = backoff_delay(self.interval, self.state.failures, self._rand)
        self._schedule(delay)
