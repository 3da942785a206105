"""
The explorer's RPC methods and the service tree that serves them.

Long because: the explorer's methods and the one factory that wires them read best
together: each method's collaborators are built a screen below it.
"""

import collections
import os
import time

from twisted.application import service
from twisted.logger import Logger

import hero_compute
from hero_compute.rpc.addresses import AddressError, parse_address
from hero_compute.rpc.authz import EXPLORER_POLICY
from hero_compute.rpc.dispatch import Dispatcher
from hero_compute.rpc.errors import InvalidParams, RefusedByPolicy, RpcError
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.http_server import make_factory
from hero_compute.rpc.limits import Limits
from hero_compute.rpc.listeners import Listeners
from hero_compute.rpc.metrics import Histogram
from hero_compute.rpc.schema import load_schema

from .metrics import HEARTBEAT_BUCKETS, CallStats, make_metrics
from .proxy import Proxy, forbidden_target, is_loopback
from .registry import Heartbeat, LivenessLog, NodeRecord, Registry, sweep_interval
from .resolver import CachingResolver
from .store import DURABLE_FIELDS
from .trust import ExplorerTrust

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

#: A node is told to heartbeat this many times per ``offline_after`` (``next_heartbeat``
#: in the answer): it may then miss two heartbeats in a row, to a lost packet or a slow
#: explorer, before it is declared offline.
HEARTBEATS_PER_OFFLINE = 3


class _Refused(RefusedByPolicy):
    """-32010 for a heartbeat, with the reason it is counted under in the metrics."""

    def __init__(self, reason, message):
        RefusedByPolicy.__init__(self, message)
        self.reason = reason


class ExplorerMethods:
    """
    The ``explorer.*`` methods.  Who may call which is decided before they run (the
    roles table, :data:`~hero_compute.rpc.authz.EXPLORER_POLICY`); what is left here is
    per-node state: a node's secret or certificate, and where it may be reached.

    :param registry: an :class:`INodeRegistry`
    :param proxy: the :class:`~hero_compute.explorer.proxy.Proxy` for ``explorer.call``
    :param clock: the clock, for uptime
    :param trust: the :class:`~hero_compute.explorer.trust.ExplorerTrust` (state,
        tokens, certificates)
    :param listeners: a :class:`Listeners` (for ``explorer.info``), or None
    """

    def __init__(self, registry, proxy, clock, trust, listeners=None, limits=None):
        self._registry = registry
        self._proxy = proxy
        self._clock = clock
        self._trust = trust
        self._listeners = listeners
        self._limits = limits or Limits()
        self._started = clock.seconds()
        #: Refusals by reason, for metrics.
        self.refusals = collections.Counter()
        #: Heartbeats accepted, refused by reason, and how long the accepted ones
        #: took, for metrics.
        self.heartbeats = 0
        self.heartbeat_refusals = collections.Counter()
        self.heartbeat_seconds = Histogram(HEARTBEAT_BUCKETS)
        #: ``explorer.call``, counted by method and outcome, for metrics.
        self.calls = CallStats(proxy)
        # New node ids per source address in the current minute: (minute, {host: n}).
        self._new_ids = (None, {})

    def register(self, rpc):
        """
        Publish the methods on a :class:`~hero_compute.rpc.dispatch.Dispatcher`.
        """
        rpc.register("explorer.heartbeat", self.heartbeat, context=True)
        rpc.register("explorer.leave", self.leave, context=True)
        rpc.register("explorer.list_nodes", self.list_nodes)
        rpc.register("explorer.query_nodes", self.query_nodes)
        rpc.register("explorer.get_node", self.get_node)
        rpc.register("explorer.remove_node", self.remove_node)
        rpc.register("explorer.call", self.calls.call)
        rpc.register("explorer.info", self.info)
        rpc.register("explorer.create_token", self._trust.create_token)
        rpc.register("explorer.enroll", self._trust.enroll)
        rpc.register("explorer.renew", self._trust.renew, context=True)
        rpc.register("explorer.revoke", self.revoke)

    def heartbeat(
        self,
        context,
        node_id,
        socket_path,
        name=None,
        version="",
        capacity=None,
        usage=None,
        vm_count=0,
        labels=None,
        secret=None,
    ):
        """
        Record a node's heartbeat.

        :param context: the :class:`CallContext`: how it came (a heartbeat over the
            network claiming a Unix address, or a local one, is refused) and, over TLS,
            the certificate that speaks for the node
        :param secret: the node secret, which the node id is bound to (CONTRACT §6)
        """
        started = time.perf_counter()
        try:
            answer = self._heartbeat(
                context,
                node_id,
                socket_path,
                name,
                version,
                capacity,
                usage,
                vm_count,
                labels,
                secret,
            )
        except RpcError as e:
            # Ours say why; the others are the trust's: the node's secret or certificate
            # does not speak for it.
            self.heartbeat_refusals[getattr(e, "reason", "identity")] += 1
            raise
        self.heartbeats += 1
        self.heartbeat_seconds.observe(time.perf_counter() - started)
        return answer

    def _heartbeat(
        self,
        context,
        node_id,
        socket_path,
        name,
        version,
        capacity,
        usage,
        vm_count,
        labels,
        secret,
    ):
        try:
            address = parse_address(socket_path)
        except AddressError as e:
            error = InvalidParams(f"socket_path: {e}")
            error.reason = "socket_path"
            raise error from None
        if context.transport != "unix" and address.is_unix:
            raise _Refused(
                "unix_address",
                f"a heartbeat over {context.transport.upper()} cannot claim the Unix "
                f"address {address.uri}: set NODE_TCP_ADDR or NODE_TLS_ADDR (and "
                "NODE_ADVERTISE_ADDR if needed) on the node",
            )
        if context.transport == "tls" and address.scheme != "tls":
            raise _Refused(
                "tls_address",
                f"a node that heartbeats over TLS must be reached over TLS, not at "
                f"{address.uri}: set NODE_TLS_ADDR on the node",
            )
        remote = context.transport != "unix" and not is_loopback(context.host)
        if remote:
            reason = forbidden_target(address.host)
            if reason is not None:
                raise _Refused(
                    "forbidden_target",
                    f"a node on another host may not advertise {address.uri}: {reason}",
                )
        old = self._registry.find(node_id)
        if old is None:
            self._admit(node_id, context)
        self._trust.check_node(node_id, secret, context)
        record = self._registry.heartbeat(
            Heartbeat(
                node_id=node_id,
                socket_path=address.uri,
                transport=context.transport,
                name=name or node_id,
                version=version,
                capacity=capacity or {},
                usage=usage or {},
                vm_count=vm_count,
                labels=labels or {},
                remote=remote,
            )
        )
        if old is None or any(
            getattr(old, f) != getattr(record, f) for f in DURABLE_FIELDS
        ):
            # Written on first sight and when the address, name or labels change: never
            # per heartbeat (last_seen is flushed in batches).
            self._trust.save_node(record)
        return {
            "accepted": True,
            "next_heartbeat": self._registry.offline_after / HEARTBEATS_PER_OFFLINE,
        }

    def _admit(self, node_id, context):
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
        minute = int(self._clock.seconds() // 60)
        seen_minute, counts = self._new_ids
        if seen_minute != minute:
            counts = {}
            self._new_ids = (minute, counts)
        host = context.host or context.peer
        count = counts.get(host, 0)
        if count >= limits.new_nodes_per_addr:
            self._refuse(
                "new_nodes_per_addr",
                f"{host} has registered {count} new node ids this minute "
                f"(EXPLORER_NEW_NODES_PER_ADDR): try again later",
                context,
            )
        counts[host] = count + 1

    def _refuse(self, reason, message, context):
        self.refusals[reason] += 1
        self._registry.note(
            "refused ({reason}) from {peer}: {message}",
            reason=reason,
            peer=context.peer,
            message=message,
        )
        raise _Refused(reason, message)

    def leave(self, context, node_id, secret=None):
        """Mark a node offline at once (its secret or certificate must speak for it)."""
        self._registry.get(node_id)
        self._trust.check_node(node_id, secret, context)
        self._registry.leave(node_id)
        return True

    def list_nodes(self, status=None):
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

    def query_nodes(self, status=None, labels=None, limit=QUERY_LIMIT, cursor=None):
        """
        A page of the fleet in node id order.

        :param labels: only nodes carrying all of these labels
        :param cursor: the ``next_cursor`` of the previous page
        :return: ``{"nodes": [...], "next_cursor": str or None}``
        """
        now = self._clock.seconds()
        after = self._registry.offline_after
        wanted = tuple((labels or {}).items())

        def keep(record):
            if status is not None and record.status(now, after) != status:
                return False
            return all(record.labels.get(k) == v for k, v in wanted)

        records, next_cursor = self._registry.page(cursor, limit, keep)
        return {
            "nodes": [r.to_wire(now, after) for r in records],
            "next_cursor": next_cursor,
        }

    def get_node(self, node_id):
        """One node."""
        return self._registry.get(node_id).to_wire(
            self._clock.seconds(), self._registry.offline_after
        )

    def remove_node(self, node_id):
        """Forget a node, and what bound its id: its next heartbeat binds it anew."""
        self._registry.remove(node_id)
        self._trust.forget_node(node_id)
        return True

    def revoke(self, node_id):
        """Refuse a node's certificates and secret from now on; it goes offline."""
        self._trust.revoke(node_id)
        if self._registry.find(node_id) is not None:
            self._registry.leave(node_id)
        return True

    def info(self):
        """About this explorer."""
        counts = {"online": 0, "offline": 0}
        for record in self._registry.records():
            counts[self._registry.status(record)] += 1
        return {
            "version": hero_compute.__version__,
            "uptime_s": self._clock.seconds() - self._started,
            "listeners": list(self._listeners.bound) if self._listeners else [],
            "nodes": counts,
        }


class ExplorerService(service.MultiService):
    """
    The explorer's root service; :func:`make_explorer` builds it and its children.

    On start it opens its state (the fleet as last known, identities, tokens) and its
    TLS material, before any listener binds.

    :param registry: the :class:`Registry`
    :param client: the :class:`RpcClient` of the proxy, closed when the explorer stops
    :param rpc: the :class:`~hero_compute.rpc.dispatch.Dispatcher` serving the methods
    :param listeners: the :class:`Listeners`
    :param trust: the :class:`~hero_compute.explorer.trust.ExplorerTrust`
    """

    def __init__(self, registry, client, rpc, listeners, trust):
        service.MultiService.__init__(self)
        self.registry = registry
        self.client = client
        self.rpc = rpc
        self.listeners = listeners
        self.trust = trust

    def privilegedStartService(self):
        self.trust.open()
        self.registry.load(NodeRecord(**n) for n in self.trust.load_nodes())
        self.trust.start_tls(self.listeners, self.client)
        service.MultiService.privilegedStartService(self)

    def startService(self):
        if not self.trust.opened:
            self.privilegedStartService()
        service.MultiService.startService(self)

    def stopService(self):
        d = service.MultiService.stopService(self)
        d.addBoth(lambda _: self.client.close())
        d.addBoth(
            lambda _: self.trust.close(
                {r.node_id: r.last_seen for r in self.registry.records()}
            )
        )
        return d


def make_explorer(
    *,
    reactor,
    clock,
    listen,
    offline_after,
    state_dir,
    socket_dirs=(),
    tls=None,
    call_timeout=CALL_TIMEOUT,
    connect_timeout=CONNECT_TIMEOUT,
    node_cert_days=90.0,
    limits=None,
    metrics=None,
):
    """
    Build the explorer's service tree; nothing is opened until it starts::

        ExplorerService (opens the state and TLS material on start)
        ├── "listeners": Listeners (one per endpoint string, and mutual TLS)
        │                -> HTTP factory -> authorization -> Dispatcher
        ├── "liveness":  LivenessLog over the Registry
        └── "metrics":   GET /metrics and the reactor's lag, when asked for

    :param reactor: the reactor to listen and connect with
    :param clock: an ``IReactorTime`` for liveness, uptime and the sweep (Unix seconds)
    :param listen: Twisted server endpoint strings to serve on
    :param socket_dirs: directories to create for Unix sockets when starting
    :param offline_after: seconds of silence before a node is offline
    :param state_dir: the directory of ``explorer.db`` (``EXPLORER_STATE_DIR``)
    :param tls: an :class:`~hero_compute.explorer.trust.TLSSettings`, or None
    :param call_timeout: seconds allowed for a proxied call
    :param connect_timeout: seconds allowed to connect to a node
    :param node_cert_days: life of the certificates it signs for nodes, in days
    :param limits: the :class:`~hero_compute.rpc.limits.Limits` (defaults otherwise)
    :param metrics: a Twisted server endpoint string to serve Prometheus metrics on
        (``GET /metrics``), or None for none
    :return: the :class:`ExplorerService`
    """
    limits = limits or Limits()
    registry = Registry(clock, offline_after)
    client = RpcClient(
        reactor,
        timeout=call_timeout,
        connect_timeout=connect_timeout,
        max_response=limits.max_reply,
    )
    rpc = Dispatcher(
        load_schema("explorer"),
        hero_compute.__version__,
        authorize=_authorize,
        max_batch=limits.max_batch,
        max_response=limits.max_response,
    )
    factory = make_factory(rpc, limits=limits)
    listeners = Listeners(factory, listen, socket_dirs, reactor)
    trust = ExplorerTrust(
        clock=clock,
        reactor=reactor,
        db_path=os.path.join(state_dir, "explorer.db"),
        tls=tls,
        factory=factory,
        node_cert_days=node_cert_days,
    )
    proxy = Proxy(
        client,
        registry,
        call_timeout,
        CachingResolver(reactor).resolve,
        calls_per_node=limits.calls_per_node,
        calls_total=limits.calls_total,
    )
    methods = ExplorerMethods(registry, proxy, clock, trust, listeners, limits)
    methods.register(rpc)

    explorer = ExplorerService(registry, client, rpc, listeners, trust)
    listeners.setName("listeners")
    listeners.setServiceParent(explorer)
    liveness = LivenessLog(
        registry,
        clock,
        sweep_interval(offline_after),
        forget_after=limits.forget_after,
        forgotten=trust.forget_record,
    )
    liveness.setName("liveness")
    liveness.setServiceParent(explorer)
    if metrics is not None:
        make_metrics(
            listen=metrics,
            methods=methods,
            registry=registry,
            proxy=proxy,
            factory=factory,
            clock=clock,
            reactor=reactor,
        ).setServiceParent(explorer)
    return explorer


def _authorize(context, method, params):
    EXPLORER_POLICY.check(context.transport, context.identity, method, params)
