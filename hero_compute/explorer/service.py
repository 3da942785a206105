"""
The explorer's RPC methods (the service tree that serves them is :mod:`.tree`'s).
"""

from __future__ import annotations

import collections
import functools
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, interfaces
from twisted.logger import Logger

import hero_compute
from hero_compute.rpc.context import CallContext
from hero_compute.rpc.dispatch import Dispatcher
from hero_compute.rpc.errors import RefusedByPolicy, RpcError
from hero_compute.rpc.limits import Limits
from hero_compute.rpc.listeners import Listeners
from hero_compute.rpc.metrics import Histogram

from .metrics import HEARTBEAT_BUCKETS, CallStats
from .new_ids import NewIds
from .placing import PlacementMethods
from .proxy import Proxy, is_loopback
from .reachable import Refused, checked_address
from .records import Heartbeat, NodeRecord, StaleSession
from .registry import HEARTBEATS_PER_OFFLINE, Registry
from .store import DURABLE_FIELDS
from .trust import ExplorerTrust
from .ui_accounts import UiAccounts

log = Logger()

#: ``explorer.list_nodes`` answers at most this many nodes (CONTRACT §7); past it, one
#: call would build tens of megabytes while everyone else waits.
LIST_LIMIT = 10_000

#: ``explorer.query_nodes``' page size, unless the caller asks for another.
QUERY_LIMIT = 1000

#: Seconds a proxied call may take: longer than a node's slowest operation, a graceful
#: ``vm.stop`` (about 65 s at worst).
CALL_TIMEOUT = 90.0

#: Seconds a proxied call may spend connecting: a node that cannot even be reached
#: within this is reported unreachable (-32003) long before :data:`CALL_TIMEOUT`.
CONNECT_TIMEOUT = 5.0


#: A heartbeat changing one of these is written to the store.
_DURABLE = frozenset(DURABLE_FIELDS)


class ExplorerMethods:
    """
    The ``explorer.*`` methods.  Who may call which is decided before they run (the
    roles table, :data:`~hero_compute.rpc.authz.EXPLORER_POLICY`); what is left here is
    per-node state: a node's secret or certificate, and where it may be reached.

    :param registry: an :class:`INodeRegistry`
    :param proxy: the :class:`~hero_compute.explorer.proxy.Proxy` for ``explorer.call``
    :param clock: the clock, for uptime
    :param trust: the :class:`~hero_compute.explorer.trust.ExplorerTrust` (identities,
        tokens, certificates)
    :param listeners: a :class:`Listeners` (for ``explorer.info``), or None
    :param state: the :class:`~hero_compute.explorer.state.ExplorerState`: its record
        writer keeps changed node records; its ``store_state`` is reported
    """

    def __init__(
        self,
        registry: Registry,
        proxy: Proxy,
        clock: interfaces.IReactorTime,
        trust: ExplorerTrust,
        listeners: Listeners | None = None,
        limits: Limits | None = None,
        state: Any = None,
    ) -> None:
        self._registry = registry
        self._proxy = proxy
        self._clock = clock
        self._trust = trust
        self._state = state
        self._listeners = listeners
        self._limits = limits or Limits()
        self._started = clock.seconds()
        #: Names this explorer process to its nodes: a delta heartbeat must carry it.
        self.session = secrets.token_hex(8)
        self._next_heartbeat = registry.offline_after / HEARTBEATS_PER_OFFLINE
        #: Refusals by reason, for metrics.
        self.refusals: collections.Counter[str] = collections.Counter()
        #: Heartbeats accepted, refused by reason, and how long the accepted ones
        #: took, for metrics.
        self.heartbeats = 0
        self.heartbeat_refusals: collections.Counter[str] = collections.Counter()
        self.heartbeat_seconds = Histogram(HEARTBEAT_BUCKETS)
        #: ``explorer.call``, counted by method and outcome, for metrics.
        self.calls = CallStats(proxy)
        # New node ids per source address, in a sliding minute.
        self._new_ids = NewIds(clock)
        #: The dashboard's users: login tokens and sessions (CONTRACT §11).
        #: Their login tokens are in the trust's store, sessions here.
        self.accounts = UiAccounts(clock, lambda: trust.store, trust.run_on_store)

    def register(self, rpc: Dispatcher) -> None:
        """
        Publish the methods on a :class:`~hero_compute.rpc.dispatch.Dispatcher`.
        """
        rpc.register("explorer.heartbeat", self._counted(self.heartbeat), context=True)
        rpc.register("explorer.leave", self.leave, context=True)
        rpc.register("explorer.list_nodes", self.list_nodes)
        rpc.register("explorer.query_nodes", self.query_nodes)
        rpc.register("explorer.get_node", self.get_node)
        rpc.register("explorer.node_history", self.node_history)
        rpc.register("explorer.remove_node", self.remove_node)
        rpc.register("explorer.call", self.calls.call)
        rpc.register("explorer.info", self.info)
        rpc.register("explorer.summary", self.summary)
        self.accounts.register(rpc)
        rpc.register("explorer.create_token", self._trust.create_token)
        rpc.register("explorer.enroll", self.enroll)
        rpc.register("explorer.renew", self._trust.renew, context=True)
        rpc.register("explorer.revoke", self.revoke)
        PlacementMethods(self._registry, self.calls.call, self._clock).register(rpc)

    def _counted(self, handler):
        """
        ``handler`` with the heartbeat metrics around it (the same signature, for the
        dispatcher and the schema's drift test).
        """

        @functools.wraps(handler)
        def counted(*args, **kwargs):
            started = time.perf_counter()
            try:
                answer = handler(*args, **kwargs)
            except RpcError as e:
                # Ours say why; the others are the trust's: the node's secret or
                # certificate does not speak for it.
                self.heartbeat_refusals[getattr(e, "reason", "identity")] += 1
                raise
            self.heartbeats += 1
            self.heartbeat_seconds.observe(time.perf_counter() - started)
            return answer

        return counted

    def heartbeat(
        self,
        context: CallContext,
        node_id: str,
        socket_path: str,
        name: str | None = None,
        version: str | None = None,
        capacity: dict[str, int] | None = None,
        usage: dict[str, int] | None = None,
        vm_count: int | None = None,
        labels: dict[str, str] | None = None,
        secret: str | None = None,
        session: str | None = None,
    ) -> dict[str, Any] | defer.Deferred[dict[str, Any]]:
        """
        Record a node's heartbeat.

        :param context: the :class:`CallContext`: how it came (a heartbeat over the
            network claiming a Unix address, or a local one, is refused) and, over TLS,
            the certificate that speaks for the node
        :param secret: the node secret, which the node id is bound to (CONTRACT §6)
        :param session: the ``session`` of this explorer's last answer to the node: the
            fields the node left out are unchanged since that heartbeat (a delta).  A
            session this explorer does not hold the node's record for (it restarted,
            or forgot the node) is refused with -32602 and ``{"resend": "full"}``.
        """
        transport = context.transport
        remote = transport != "unix" and not is_loopback(context.host)
        old = self._registry.find(node_id)
        if (
            old is not None
            and socket_path == old.socket_path
            and transport == old.transport
            and remote == old.remote
        ):
            # The address its last heartbeat passed the checks with, from the same kind
            # of peer: they would pass again (they depend on nothing else).
            uri = socket_path
        else:
            uri = checked_address(socket_path, transport, remote)
        if session is not None:
            if session != self.session or old is None or old.left:
                raise StaleSession(node_id)
        elif old is None:
            self._admit(node_id, context)
        checked = self._trust.check_node(node_id, secret, context)
        fields = (name, version, capacity, usage, vm_count, labels)
        # With a shared store, a first sight of a secret is bound there first.
        return _then(
            checked, lambda: self._accept(node_id, uri, transport, remote, session, *fields)
        )

    def _accept(self, node_id, uri, transport, remote, session, *fields):
        name, version, capacity, usage, vm_count, labels = fields
        if session is None:
            # A full heartbeat: what it leaves out takes its default.
            name = name or node_id
            # One string for a fleet's few versions, not one per node.
            version = "" if version is None else sys.intern(version)
            capacity = {} if capacity is None else capacity
            usage = {} if usage is None else usage
            vm_count = 0 if vm_count is None else vm_count
            labels = {} if labels is None else labels
        elif name == "":
            name = node_id
        record, changed = self._registry.heartbeat(
            Heartbeat(
                node_id=node_id,
                socket_path=uri,
                transport=transport,
                name=name,
                version=version,
                capacity=capacity,
                usage=usage,
                vm_count=vm_count,
                labels=labels,
                remote=remote,
            )
        )
        if changed and not _DURABLE.isdisjoint(changed):
            # Written on first sight and when the address, name or labels change: never
            # per heartbeat (last_seen is flushed in batches).
            self._state.records.save_node(record)
        return {
            "accepted": True,
            "next_heartbeat": self._next_heartbeat,
            "session": self.session,
        }

    def _admit(self, node_id, context) -> None:
        """Refuse a new node id beyond the registry's size or its source's rate."""
        limits = self._limits
        if len(self._registry) >= limits.max_nodes:
            self._refuse(
                "max_nodes",
                f"the registry is full ({limits.max_nodes} nodes, "
                "EXPLORER_MAX_NODES): new node ids are refused",
                context,
            )
        if context.transport == "unix":
            return
        host = context.host or context.peer
        count = self._new_ids.count(host)
        if count >= limits.new_nodes_per_addr:
            self._refuse(
                "new_nodes_per_addr",
                f"{host} has registered {count} new node ids in the last minute "
                f"(EXPLORER_NEW_NODES_PER_ADDR): try again later",
                context,
            )
        self._new_ids.add(host)

    def _refuse(self, reason, message, context):
        self.refusals[reason] += 1
        self._registry.note(
            "refused ({reason}) from {peer}: {message}",
            reason=reason,
            peer=context.peer,
            message=message,
        )
        raise Refused(reason, message)

    def leave(
        self, context: CallContext, node_id: str, secret: str | None = None
    ) -> bool | defer.Deferred[bool]:
        """Mark a node offline at once (its secret or certificate must speak for it)."""
        self._registry.get(node_id)
        checked = self._trust.check_node(node_id, secret, context)
        leave: Callable[[str], object] = self._registry.leave
        return _then(checked, lambda: leave(node_id) or True)

    def list_nodes(self, status: str | None = None) -> list[dict[str, Any]]:
        """All nodes, or those of one status: for small fleets (see :meth:`query_nodes`)."""
        now = self._clock.seconds()
        after = self._registry.offline_after
        records = self._registry.records()
        if status is not None:
            records = [r for r in records if r.status(now, after) == status]
        if len(records) > LIST_LIMIT:
            raise RefusedByPolicy(
                f"{len(records)} nodes: explorer.list_nodes answers at most {LIST_LIMIT}; "
                "page through them with explorer.query_nodes"
            )
        return [r.to_wire(now, after) for r in records]

    def query_nodes(
        self,
        status: str | None = None,
        labels: dict[str, str] | None = None,
        limit: int = QUERY_LIMIT,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """
        A page of the fleet in node id order.

        :param labels: only nodes carrying all of these labels
        :param cursor: the ``next_cursor`` of the previous page
        :return: ``{"nodes": [...], "next_cursor": str or None}``
        """
        now = self._clock.seconds()
        after = self._registry.offline_after
        wanted = tuple((labels or {}).items())

        def keep(record: NodeRecord) -> bool:
            if status is not None and record.status(now, after) != status:
                return False
            return all(record.labels.get(k) == v for k, v in wanted)

        filtered = status is not None or wanted
        records, next_cursor = self._registry.page(
            cursor, limit, keep if filtered else None
        )
        return {
            "nodes": [r.to_wire(now, after) for r in records],
            "next_cursor": next_cursor,
        }

    def get_node(self, node_id: str) -> dict[str, Any]:
        """One node."""
        return self._registry.get(node_id).to_wire(
            self._clock.seconds(), self._registry.offline_after
        )

    def node_history(self, node_id: str) -> dict[str, Any]:
        """A node's last heartbeat times (Unix seconds, oldest first)."""
        self._registry.get(node_id)
        return {"node_id": node_id, "heartbeats": self._registry.history.times(node_id)}

    def remove_node(self, node_id: str) -> bool | defer.Deferred[bool]:
        """Forget a node, and what bound its id: its next heartbeat binds it anew."""
        self._registry.get(node_id)
        # A shared store first: when it is down the node stays (-32007).
        return _then(self._trust.forget_node(node_id), lambda: self._removed(node_id))

    def _removed(self, node_id: str) -> bool:
        if self._registry.find(node_id) is not None:
            self._registry.remove(node_id)
        return True

    def enroll(self, token: str, csr: str) -> Any:
        """A certificate for a node, by join token; an id in the registry needs a
        token made for it."""
        return self._trust.enroll(
            token, csr, lambda node_id: self._registry.find(node_id) is not None
        )

    def revoke(self, node_id: str) -> bool | defer.Deferred[bool]:
        """Refuse a node's certificates and secret from now on; it goes offline."""
        return _then(self._trust.revoke(node_id), lambda: self._revoked(node_id))

    def _revoked(self, node_id: str) -> bool:
        if self._registry.find(node_id) is not None:
            self._registry.leave(node_id)
        return True

    def summary(self) -> dict[str, Any]:
        """
        The fleet's totals (CONTRACT §11), from the sums the registry keeps as
        heartbeats arrive: capacity, usage, VMs and labels are the online nodes' (what
        offline ones last reported is history).

        :return: ``{"nodes": {"online", "offline"}, "vms", "capacity", "usage",
            "labels"}``
        """
        return self._registry.summary.answer(self._clock.seconds())

    def info(self) -> dict[str, Any]:
        """About this explorer."""
        # Kept up to date by the summary: a scan of the registry took ~5 ms at 100,000
        # nodes, and explorer.info is what monitoring polls.
        counts = self._registry.summary.counts(self._clock.seconds())
        return {
            "version": hero_compute.__version__,
            "uptime_s": self._clock.seconds() - self._started,
            "listeners": list(self._listeners.bound) if self._listeners else [],
            "nodes": counts,
            "store": self.store_state(),
        }

    def store_state(self) -> dict[str, str]:
        """:return: the state store's ``{"kind", "state"}`` (for metrics too)"""
        return self._state.store_state


def _then(pending: defer.Deferred[Any] | None, after: Callable[[], Any]) -> Any:
    """``after()``, once ``pending`` (None, or a shared store's Deferred) is done."""
    return after() if pending is None else pending.addCallback(lambda _: after())
