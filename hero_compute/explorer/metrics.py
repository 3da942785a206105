"""
The explorer's Prometheus metrics, read at scrape time from the objects its methods use:
the registry (nodes by status and transport), the methods' counters (heartbeats
accepted and refused, and how long they took), the proxy (calls by method and outcome,
in flight, refused busy), the HTTP factory (connections, refusals) and the reactor's lag.
"""

from __future__ import annotations

import collections
import operator
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet import defer
from twisted.python.failure import Failure

from hero_compute.rpc.errors import (
    NodeNotFound,
    NodeOffline,
    NodeUnreachable,
    RefusedByPolicy,
    RpcError,
)
from hero_compute.rpc.lag import ReactorLag
from hero_compute.rpc.metrics import (
    Histogram,
    MetricsService,
    TransportCollector,
    histogram_family,
    metrics_listener,
    metrics_registry,
)
from hero_compute.rpc.schema import load_schema

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from twisted.internet.interfaces import IReactorTime

    from hero_compute.rpc.http_server import RpcHTTPFactory
    from hero_compute.rpc.listen import Listen

    from .proxy import Proxy
    from .registry import Registry


#: Buckets of the time an ``explorer.heartbeat`` takes to handle, in seconds (tens of
#: microseconds when all is well).
HEARTBEAT_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.1,
)

#: Buckets of a proxied call's time, in seconds, up to the call timeout.
CALL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    90,
)

#: How a proxied call ended, by the code of its error (see :func:`call_outcome`).
_OUTCOMES = {
    NodeNotFound.code: "not_found",
    NodeOffline.code: "offline",
    NodeUnreachable.code: "unreachable",
    RefusedByPolicy.code: "refused",
}

TRANSPORTS = ("unix", "tcp", "tls")
STATUSES = ("online", "offline")


def call_outcome(result: object, busy: bool) -> str:
    """
    :param result: what a proxied call gave: its result, or a :class:`Failure`
    :param busy: whether the proxy refused it as busy
    :return: ``ok``, ``busy``, ``unreachable``, ``offline``, ``not_found``, ``refused``
        (-32010, the explorer's or the node's), ``node_error`` (any other error of the
        node's), ``cancelled`` (the caller hung up) or ``internal``
    """
    if not isinstance(result, Failure):
        return "ok"
    if busy:
        return "busy"
    if result.check(defer.CancelledError):
        return "cancelled"
    error = result.value
    if isinstance(error, RpcError):
        return _OUTCOMES.get(error.code, "node_error")
    return "internal"


class CallStats:
    """
    ``explorer.call`` through the proxy, counted and timed by method and outcome.

    :param proxy: the :class:`~hero_compute.explorer.proxy.Proxy`
    :param methods: the method names counted by name; any other is counted as
        ``other`` (a caller picks the name: it must not grow the metrics without bound).
        The node schema's by default
    """

    def __init__(self, proxy: Proxy, methods: Iterable[str] | None = None) -> None:
        self._proxy = proxy
        if methods is None:
            methods = load_schema("node").methods
        self._methods = frozenset(methods)
        #: Calls by ``(method, outcome)``.
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        #: A :class:`Histogram` of the calls' seconds, by method.
        self.seconds: dict[str, Histogram] = {}

    def call(self, node_id: str, method: str, params: Any = None) -> defer.Deferred[Any]:
        """
        Proxy a call to a node (``explorer.call``).

        :return: a Deferred of the node's result, or its error unchanged
        """
        started = time.perf_counter()
        proxy = self._proxy
        busy = proxy.busy
        try:
            d = proxy.call(node_id, method, params)
        except Exception:
            # Counted as maybeDeferred would have had it, without its cost per call.
            d = defer.fail()
        else:
            if not isinstance(d, defer.Deferred):
                d = defer.succeed(d)
        # A busy refusal is synchronous: a later one counts another call's.
        return d.addBoth(self._done, method, started, proxy.busy != busy)

    def _done(self, result: Any, method: str, started: float, busy: bool) -> Any:
        name = method if method in self._methods else "other"
        self.counts[name, call_outcome(result, busy)] += 1
        histogram = self.seconds.get(name)
        if histogram is None:
            histogram = self.seconds[name] = Histogram(CALL_BUCKETS)
        histogram.observe(time.perf_counter() - started)
        return result


_TRANSPORT = operator.attrgetter("transport")


class ExplorerCollector:
    """
    The explorer's own metric families.

    :param methods: the :class:`~hero_compute.explorer.service.ExplorerMethods`
    :param registry: the :class:`~hero_compute.explorer.registry.Registry`
    :param proxy: the :class:`~hero_compute.explorer.proxy.Proxy`
    """

    def __init__(self, methods: Any, registry: Registry, proxy: Proxy) -> None:
        self._methods = methods
        self._registry = registry
        self._proxy = proxy

    def collect(self) -> Iterator[Metric]:
        """The metric families, read now."""
        # By transport, then the few offline ones taken off: C loops over the fleet,
        # not a status() call per record (at 100,000 nodes that held the reactor for
        # tens of milliseconds at every scrape).
        records = self._registry.records()
        offline = self._registry.offline(self._registry.clock.seconds(), records)
        by_transport = collections.Counter(map(_TRANSPORT, records))
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for transport, count in collections.Counter(map(_TRANSPORT, offline)).items():
            counts["offline", transport] = count
            by_transport[transport] -= count
        for transport, count in by_transport.items():
            counts["online", transport] = count
        nodes = GaugeMetricFamily(
            "hero_explorer_nodes",
            "Nodes in the registry, by status and by how their last heartbeat came",
            labels=["status", "transport"],
        )
        for status in STATUSES:
            for transport in TRANSPORTS:
                nodes.add_metric([status, transport], counts[status, transport])
        yield nodes

        methods = self._methods
        yield CounterMetricFamily(
            "hero_explorer_heartbeats_accepted",
            "Heartbeats accepted",
            value=methods.heartbeats,
        )
        refused = CounterMetricFamily(
            "hero_explorer_heartbeats_refused",
            "Heartbeats refused by the explorer's rules (-32010, or -32602 for an "
            "unusable address), by reason",
            labels=["reason"],
        )
        for reason, count in list(methods.heartbeat_refusals.items()):
            refused.add_metric([reason], count)
        yield refused
        yield histogram_family(
            "hero_explorer_heartbeat_seconds",
            "Time to handle an accepted heartbeat",
            [],
            [((), methods.heartbeat_seconds)],
        )

        calls = CounterMetricFamily(
            "hero_explorer_calls",
            "Calls proxied to nodes (explorer.call), by method and outcome",
            labels=["method", "outcome"],
        )
        for (method, outcome), count in list(methods.calls.counts.items()):
            calls.add_metric([method, outcome], count)
        yield calls
        yield histogram_family(
            "hero_explorer_call_seconds",
            "Time of a call proxied to a node, by method",
            ["method"],
            list(methods.calls.seconds.items()),
        )
        yield GaugeMetricFamily(
            "hero_explorer_calls_in_flight",
            "Calls proxied to nodes and not yet answered",
            value=self._proxy.total,
        )
        store = methods.store_state()
        up = GaugeMetricFamily(
            "hero_explorer_store_up",
            "Whether the state store answers (1) or not (0), by kind (sqlite, postgresql)",
            labels=["kind"],
        )
        up.add_metric([store["kind"]], 1 if store["state"] == "up" else 0)
        yield up

    def refusals(self) -> tuple[tuple[str, int], ...]:
        """:return: ``(limit, count)`` of the explorer's own limits"""
        return (
            *self._methods.refusals.items(),
            ("calls_in_flight", self._proxy.busy),
            ("max_reply", self._proxy.too_large),
        )


def make_metrics(
    *,
    listen: Listen,
    methods: Any,
    registry: Registry,
    proxy: Proxy,
    factory: RpcHTTPFactory,
    clock: IReactorTime,
    reactor: Any = None,
) -> MetricsService:
    """
    The explorer's metrics: ``GET /metrics`` on its own listener, and the reactor's lag.

    :param listen: the :class:`~hero_compute.rpc.listen.Listen` to serve them on
    :param methods: the :class:`~hero_compute.explorer.service.ExplorerMethods`
    :param registry: the :class:`~hero_compute.explorer.registry.Registry`
    :param proxy: the :class:`~hero_compute.explorer.proxy.Proxy`
    :param factory: the HTTP factory of the JSON-RPC listeners
    :param clock: the ``IReactorTime`` to measure the lag with
    :return: a ``MultiService``; its ``registry`` is the ``CollectorRegistry``
    """
    lag = ReactorLag(clock)
    explorer = ExplorerCollector(methods, registry, proxy)
    metrics = MetricsService(
        metrics_registry(explorer, TransportCollector(factory, explorer.refusals), lag)
    )
    lag.setServiceParent(metrics)
    metrics_listener(
        metrics.registry, listen, reactor, factory.admission.sibling()
    ).setServiceParent(metrics)
    return metrics
