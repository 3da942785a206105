"""
The explorer's service tree: :func:`make_explorer` wires the registry, the proxy, the
trust state, the listeners and the methods from plain keyword arguments; nothing is
opened until :class:`ExplorerService` starts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hero_compute.rpc.authz import EXPLORER_POLICY
from hero_compute.rpc.context import CallContext
from hero_compute.rpc.dispatch import Dispatcher, service_dispatcher
from hero_compute.rpc.heap import FrozenHeap
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.http_server import make_factory
from hero_compute.rpc.interfaces import IRpcClient
from hero_compute.rpc.limits import Limits
from hero_compute.rpc.listen import Listen
from hero_compute.rpc.listeners import Listeners
from hero_compute.rpc.websocket_server import Routes

from .audit import AuditLog
from .console import console_route
from .dashboard import make_dashboard
from .events import EventLog
from .liveness import LivenessLog, sweep_interval
from .metrics import make_metrics
from .proxy import Proxy
from .registry import Registry
from .resolver import CachingResolver
from .service import CALL_TIMEOUT, CONNECT_TIMEOUT, ExplorerMethods
from .state import ExplorerState
from .tls_material import ExplorerTLS, TLSSettings
from .trust import ExplorerTrust

log = Logger()


class ExplorerService(service.MultiService):
    """
    The explorer's root service; :func:`make_explorer` builds it and its children.

    Its children start in the order they were added (the tree in :func:`make_explorer`)
    and stop in the reverse order, each once the one after it has stopped: the state
    store opens first and closes last.

    :param registry: the :class:`Registry`
    :param client: the :class:`RpcClient` of the proxy
    :param rpc: the :class:`~hero_compute.rpc.dispatch.Dispatcher` serving the methods
    :param listeners: the :class:`Listeners`
    :param state: the :class:`~hero_compute.explorer.state.ExplorerState`
    :param trust: the :class:`~hero_compute.explorer.trust.ExplorerTrust`
    :param tls: the :class:`~hero_compute.explorer.tls_material.ExplorerTLS`
    :param audit: the :class:`~hero_compute.explorer.audit.AuditLog`
    """

    def __init__(
        self,
        registry: Registry,
        client: IRpcClient,
        rpc: Dispatcher,
        listeners: Listeners,
        state: ExplorerState,
        trust: ExplorerTrust,
        tls: ExplorerTLS,
        audit: AuditLog,
    ) -> None:
        service.MultiService.__init__(self)
        self.audit = audit
        self.registry = registry
        self.client = client
        self.rpc = rpc
        self.listeners = listeners
        self.state = state
        self.trust = trust
        self.tls = tls
        self._privileged = False

    def privilegedStartService(self) -> None:
        self._privileged = True
        service.MultiService.privilegedStartService(self)

    def startService(self) -> None:
        if not self._privileged:
            # Started without twistd's privileged step (an embedder, a test): the
            # listeners still clear stale sockets and explain a failed bind.
            self.privilegedStartService()
        service.MultiService.startService(self)

    def stopService(self) -> defer.Deferred[None]:
        self._privileged = False
        service.Service.stopService(self)
        d = defer.succeed(None)
        for child in reversed(list(self)):
            d.addBoth(_stop, child)
        return d


def _stop(result: object, child: service.IService) -> defer.Deferred[None]:
    """Stop ``child``, whatever the previous child's stop came to (logged if failed)."""
    if isinstance(result, Failure):
        log.failure("stopping a service", result)
    return defer.maybeDeferred(child.stopService)


class _OnStop(service.Service):
    """A child that only calls ``stop()`` when the tree stops, in its turn."""

    def __init__(self, name: str, stop: Callable[[], object]) -> None:
        self.setName(name)
        self._stop = stop

    def stopService(self) -> object:
        service.Service.stopService(self)
        return self._stop()


def make_explorer(
    *,
    reactor: Any,
    clock: IReactorTime,
    listen: Iterable[Listen | str],
    offline_after: float,
    state_dir: str,
    database: str | None = None,
    socket_dirs: Iterable[str] = (),
    tls: TLSSettings | None = None,
    call_timeout: float = CALL_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
    node_cert_days: float = 90.0,
    limits: Limits | None = None,
    metrics: Listen | None = None,
    ui: Listen | None = None,
    ui_token: str | None = None,
    ui_token_file: str | None = None,
    ui_tls: bool = False,
    ui_hosts: Iterable[str] | None = None,
    freeze_heap: bool = False,
) -> ExplorerService:
    """
    Build the explorer's service tree; nothing is opened until it starts.  Children
    start in this order, and stop in the reverse one::

        ExplorerService
        ├── "state":     ExplorerState: opens the state store and loads the fleet as
        │                last known into the Registry; closes it last
        ├── "audit":     writes the audit entries left at stop (AuditLog)
        ├── "trust":     ExplorerTrust: identities, tokens, enrollment over the store
        ├── "tls":       ExplorerTLS: the TLS material, the CA that signs, the proxy's
        │                certificate; adds the mutual-TLS listener to "listeners";
        │                reloads on SIGHUP
        ├── "client":    closes the proxy's connections at stop (RpcClient)
        ├── "listeners": Listeners (one per Listen record) -> HTTP factory ->
        │                authorization -> Dispatcher
        ├── "liveness":  LivenessLog over the Registry
        ├── "metrics":   GET /metrics and the reactor's lag, when asked for
        ├── "dashboard": the read-only web page on its own listener, when asked for
        └── "heap":      freezes the heap left by start-up, when asked for (last, so
                         that it starts once everything else has)

    :param reactor: the reactor to listen and connect with
    :param clock: an ``IReactorTime`` for liveness, uptime and the sweep (Unix seconds)
    :param listen: :class:`~hero_compute.rpc.listen.Listen` records to serve on (or
        Twisted server endpoint strings, as ``--listen`` takes them)
    :param socket_dirs: directories to create for Unix sockets when starting
    :param offline_after: seconds of silence before a node is offline
    :param state_dir: the directory of ``explorer.db`` (``EXPLORER_STATE_DIR``)
    :param database: ``EXPLORER_DATABASE``: another SQLite file, or a
        ``postgresql://`` URI; None for ``state_dir/explorer.db``
    :param tls: a :class:`~hero_compute.explorer.tls_material.TLSSettings`, or None
    :param call_timeout: seconds allowed for a proxied call
    :param connect_timeout: seconds allowed to connect to a node
    :param node_cert_days: life of the certificates it signs for nodes, in days
    :param limits: the :class:`~hero_compute.rpc.limits.Limits` (defaults otherwise)
    :param metrics: a :class:`~hero_compute.rpc.listen.Listen` to serve Prometheus
        metrics on (``GET /metrics``), or None for none
    :param ui: a :class:`~hero_compute.rpc.listen.Listen` to serve the dashboard on, or
        None
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
    rpc = service_dispatcher("explorer", limits, _authorize, reactor)
    factory = make_factory(rpc, limits=limits)
    # rpc/listeners.py annotates its factory as a bare Factory, which mypy reads as
    # generic in a type variable: it takes any protocol factory.
    listeners = Listeners(
        factory,  # type: ignore[arg-type]
        listen,
        socket_dirs,
        reactor,
        role="explorer",
    )
    state = ExplorerState(
        clock=clock,
        reactor=reactor,
        db_path=database or os.path.join(state_dir, "explorer.db"),
        registry=registry,
    )
    trust = ExplorerTrust(clock=clock, state=state)
    tls_material = ExplorerTLS(
        clock=clock,
        reactor=reactor,
        settings=tls,
        factory=factory,
        listeners=listeners,
        client=client,
        trust=trust,
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
    audit = AuditLog(clock, socket.gethostname(), lambda: state.store, state.run_on_store)
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
    methods = ExplorerMethods(registry, proxy, clock, trust, listeners, limits, state=state)
    # Through the audit log's door: the methods that change something are recorded.
    methods.register(events.registrar(audit.registrar(rpc)))
    rpc.register("explorer.audit", audit.query)

    explorer = ExplorerService(
        registry, client, rpc, listeners, state, trust, tls_material, audit
    )
    state.setName("state")
    state.setServiceParent(explorer)
    _OnStop("audit", audit.stop).setServiceParent(explorer)
    trust.setName("trust")
    trust.setServiceParent(explorer)
    tls_material.setName("tls")
    tls_material.setServiceParent(explorer)
    _OnStop("client", client.close).setServiceParent(explorer)
    listeners.setName("listeners")
    listeners.setServiceParent(explorer)
    liveness = LivenessLog(
        registry,
        clock,
        sweep_interval(offline_after),
        forget_after=limits.forget_after,
        forgotten=state.records.forget_record,
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
            tls=(lambda: tls_material.server_tls) if ui_tls else None,
            hosts=ui_hosts,
            admission=factory.admission.sibling(),
            # None when no Unix socket is bound, which the dashboard answers with 503;
            # its annotation (dashboard.py) says str.
            console_socket=lambda: _unix_socket(listeners.bound),  # type: ignore[arg-type,return-value]
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


def _authorize(context: CallContext, method: str, params: Any) -> None:
    EXPLORER_POLICY.check(context.transport, context.identity, method, params)


def _authorize_route(context: CallContext, route: str, params: Any) -> None:
    EXPLORER_POLICY.check_route(context.transport, context.identity, route, params)


def _unix_socket(bound: Iterable[str]) -> str | None:
    """The path of the first Unix socket among bound listeners' URIs, or None."""
    return next((u[len("unix://") :] for u in bound if u.startswith("unix://")), None)
