"""
The explorer's service tree: :func:`make_explorer` wires the registry, the proxy, the
trust state, the listeners and the methods from plain keyword arguments; nothing is
opened until :class:`ExplorerService` starts.
"""

import os
import socket

from twisted.application import service
from twisted.logger import Logger

import hero_compute
from hero_compute.rpc.authz import EXPLORER_POLICY
from hero_compute.rpc.dispatch import Dispatcher
from hero_compute.rpc.heap import FrozenHeap
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.http_server import make_factory
from hero_compute.rpc.limits import Limits
from hero_compute.rpc.listeners import Listeners
from hero_compute.rpc.schema import load_schema
from hero_compute.rpc.websocket_server import Routes

from .audit import AuditLog
from .console import console_route
from .dashboard import make_dashboard
from .events import EventLog
from .liveness import LivenessLog, sweep_interval
from .metrics import make_metrics
from .proxy import Proxy
from .records import NodeRecord
from .registry import Registry
from .resolver import CachingResolver
from .service import CALL_TIMEOUT, CONNECT_TIMEOUT, ExplorerMethods
from .trust import ExplorerTrust

log = Logger()


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
    :param audit: the :class:`~hero_compute.explorer.audit.AuditLog`, written out
        before the state closes
    """

    def __init__(self, registry, client, rpc, listeners, trust, audit=None):
        service.MultiService.__init__(self)
        self.audit = audit
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
        if self.audit is not None:
            d.addBoth(lambda _: self.audit.stop())
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
    database=None,
    socket_dirs=(),
    tls=None,
    call_timeout=CALL_TIMEOUT,
    connect_timeout=CONNECT_TIMEOUT,
    node_cert_days=90.0,
    limits=None,
    metrics=None,
    ui=None,
    ui_token=None,
    ui_token_file=None,
    ui_tls=False,
    ui_hosts=None,
    freeze_heap=False,
):
    """
    Build the explorer's service tree; nothing is opened until it starts::

        ExplorerService (opens the state and TLS material on start)
        ├── "listeners": Listeners (one per endpoint string, and mutual TLS)
        │                -> HTTP factory -> authorization -> Dispatcher
        ├── "liveness":  LivenessLog over the Registry
        ├── "metrics":   GET /metrics and the reactor's lag, when asked for
        ├── "dashboard": the read-only web page on its own listener, when asked for
        └── "heap":      freezes the heap left by start-up, when asked for (last, so
                         that it starts once everything else has)

    :param reactor: the reactor to listen and connect with
    :param clock: an ``IReactorTime`` for liveness, uptime and the sweep (Unix seconds)
    :param listen: Twisted server endpoint strings to serve on
    :param socket_dirs: directories to create for Unix sockets when starting
    :param offline_after: seconds of silence before a node is offline
    :param state_dir: the directory of ``explorer.db`` (``EXPLORER_STATE_DIR``)
    :param database: ``EXPLORER_DATABASE``: another SQLite file, or a
        ``postgresql://`` URI; None for ``state_dir/explorer.db``
    :param tls: an :class:`~hero_compute.explorer.trust.TLSSettings`, or None
    :param call_timeout: seconds allowed for a proxied call
    :param connect_timeout: seconds allowed to connect to a node
    :param node_cert_days: life of the certificates it signs for nodes, in days
    :param limits: the :class:`~hero_compute.rpc.limits.Limits` (defaults otherwise)
    :param metrics: a Twisted server endpoint string to serve Prometheus metrics on
        (``GET /metrics``), or None for none
    :param ui: a Twisted server endpoint string to serve the dashboard on, or None
    :param ui_token: the dashboard's access token, or None for a random one
    :param ui_token_file: the file ``ui_token`` came from, named in the log; without
        one, a random token is kept in ``STATE_DIR/ui-token`` (0600)
    :param ui_tls: serve the dashboard over mutual TLS with the explorer's material (a
        ``client/*`` certificate then stands in for the token)
    :param ui_hosts: the ``Host`` names the dashboard answers for, None for the defaults
    :param freeze_heap: keep the cycle collector's pauses short with a
        :class:`~hero_compute.rpc.heap.FrozenHeap` (for a process of its own: it freezes
        the whole interpreter's heap)
    :return: the :class:`ExplorerService`
    """
    limits = limits or Limits()
    registry = Registry(clock, offline_after)
    client = RpcClient(
        reactor,
        timeout=call_timeout,
        connect_timeout=connect_timeout,
        max_response=limits.max_reply,
        # As many kept warm as may run at once: fewer, and calls beyond them reconnect.
        max_per_peer=limits.calls_per_node,
        # Its results are answers passed on: written again without a walk for NaNs.
        relay=True,
    )
    rpc = Dispatcher(
        load_schema("explorer"),
        hero_compute.__version__,
        authorize=_authorize,
        max_batch=limits.max_batch,
        max_response=limits.max_response,
    )
    factory = make_factory(rpc, limits=limits)
    # rpc/listeners.py annotates its factory as a bare Factory, which mypy reads as
    # generic in a type variable: it takes any protocol factory.
    listeners = Listeners(factory, listen, socket_dirs, reactor)  # type: ignore[arg-type]
    trust = ExplorerTrust(
        clock=clock,
        reactor=reactor,
        db_path=database or os.path.join(state_dir, "explorer.db"),
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
    events = EventLog(clock)
    registry.on_event = events.node
    audit = AuditLog(clock, socket.gethostname(), lambda: trust.store, trust.run_on_store)
    console = audit.route(
        console_route(proxy, reactor, connect_timeout, limits.max_unsent),
        "console.attach",
        lambda params: f"{params['node_id']}/{params['vm_id']}",
    )
    factory.upgrade = Routes(
        [console, events.route()],
        _authorize_route,
        limits.max_unsent,
        reactor,
    )
    methods = ExplorerMethods(registry, proxy, clock, trust, listeners, limits)
    # Through the audit log's door: the methods that change something are recorded.
    methods.register(events.registrar(audit.registrar(rpc)))
    rpc.register("explorer.audit", audit.query)

    explorer = ExplorerService(registry, client, rpc, listeners, trust, audit)
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
    if ui is not None:
        make_dashboard(
            listen=ui,
            methods=methods,
            limits=limits,
            token=ui_token,
            token_file=ui_token_file or os.path.join(state_dir, "ui-token"),
            reactor=reactor,
            tls=(lambda: trust.server_tls) if ui_tls else None,
            hosts=ui_hosts,
            admission=factory.admission.sibling(),
            console_socket=lambda: _unix_socket(listeners.bound),
            # The dashboard's writes are audited (as dashboard:<user>) and evented too.
            audit=audit.record,
            register=lambda ui_rpc: methods.register(
                events.registrar(audit.registrar(ui_rpc))
            ),
        ).setServiceParent(explorer)
    if freeze_heap:
        heap = FrozenHeap(clock)
        heap.setName("heap")
        heap.setServiceParent(explorer)
    return explorer


def _authorize(context, method, params):
    EXPLORER_POLICY.check(context.transport, context.identity, method, params)


def _authorize_route(context, route, params):
    EXPLORER_POLICY.check_route(context.transport, context.identity, route, params)


def _unix_socket(bound):
    """The path of the first Unix socket among bound listeners' URIs, or None."""
    return next((u[len("unix://") :] for u in bound if u.startswith("unix://")), None)
