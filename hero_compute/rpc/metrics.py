"""
What both services need to be scraped by Prometheus: a histogram cheap enough for the
hot path, the ``GET /metrics`` listener and the transport's metrics (the reactor's lag
is :mod:`.lag`'s).

Metrics are read when scraped: a service's objects keep plain counters (an ``int``
increment on the hot path, nothing else), and a collector (``collect()``) turns their
state into metric families at scrape time.  Each service has its own
``prometheus_client.CollectorRegistry``, never the global one, so that a test can build
several in one process.

The page is rendered in the reactor thread, not through
``prometheus_client.twisted.MetricsResource``: that one runs the collectors in the
reactor's thread pool, where they would read dicts (the registry's nodes, the counters)
while the reactor thread changes them, and importing it installs the default reactor.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString
from twisted.application import service
from twisted.logger import Logger
from twisted.web import http, resource, server

import hero_compute

from .admission import Admission, AdmittedSite
from .http_server import RpcHTTPFactory
from .listen import Listen, listener_service

log = Logger()


class Histogram:
    """
    A latency histogram for one thread (the reactor's): an observation is a bisect and
    two additions, without the lock ``prometheus_client.Histogram`` takes.

    :param bounds: the buckets' upper bounds, ascending (``+Inf`` is implied)
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        #: Observations per bucket, not cumulative; the last is above every bound.
        self.counts = [0] * (len(self.bounds) + 1)
        #: The sum of the observations.
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """:return: the cumulative ``(le, count)`` pairs of the exposition format"""
        total = 0
        pairs = []
        for bound, count in zip(
            (*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True
        ):
            total += count
            pairs.append((bound, float(total)))
        return pairs


def histogram_family(
    name: str,
    documentation: str,
    labels: Sequence[str],
    by: Iterable[tuple[Any, Histogram]],
) -> HistogramMetricFamily:
    """
    :param by: ``(label values, histogram)`` pairs (a tuple of label values, or one)
    :return: the metric family of several :class:`Histogram` s
    """
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, histogram in by:
        values = values if isinstance(values, tuple) else (values,)
        family.add_metric(list(values), histogram.buckets(), histogram.sum)
    return family


class TransportCollector:
    """
    The metrics of a process's transport: its open connections, the limits that refused
    something (CONTRACT §7) and the version.  Refusals are read from the admission's
    counter (shared by every listener of the process, and by the dashboard's dispatcher),
    the listeners' dispatcher and ``refusals``, and summed by limit.

    :param factory: the :class:`~hero_compute.rpc.http_server.RpcHTTPFactory` of the
        process's listeners
    :param refusals: returns more ``(limit, count)`` pairs, the service's own
    """

    def __init__(
        self,
        factory: RpcHTTPFactory,
        refusals: Callable[[], Iterable[tuple[str, int]]] = lambda: (),
    ) -> None:
        self._factory = factory
        self._refusals = refusals

    def collect(self) -> Iterator[Metric]:
        """The metric families, read now."""
        admission = self._factory.admission
        network = sum(admission.per_host.values())
        connections = GaugeMetricFamily(
            "hero_connections_open",
            "Open JSON-RPC connections, by transport (network: TCP and TLS)",
            labels=["transport"],
        )
        connections.add_metric(["unix"], admission.open - network)
        connections.add_metric(["network"], network)
        yield connections
        yield GaugeMetricFamily(
            "hero_connection_peers",
            "Peer addresses with open TCP or TLS connections",
            value=len(admission.per_host),
        )
        refusals = CounterMetricFamily(
            "hero_refusals",
            "Requests, connections or calls refused by a limit (CONTRACT §7)",
            labels=["limit"],
        )
        # One sample per limit: a limit refusing in more than one place (the JSON-RPC
        # listeners' dispatcher and the dashboard's, both max_batch) is summed, never
        # written twice under one label (a scraper rejects the page then).
        by_limit: collections.Counter[str] = collections.Counter()
        for limit, count in (
            *admission.refusals.items(),
            *self._factory.dispatcher.refusals.items(),
            *self._refusals(),
        ):
            by_limit[limit] += count
        for limit, count in by_limit.items():
            refusals.add_metric([limit], count)
        yield refusals
        info = GaugeMetricFamily(
            "hero_build_info", "The hero_compute version, as a label", labels=["version"]
        )
        info.add_metric([hero_compute.__version__], 1)
        yield info


def metrics_registry(*collectors: Any) -> CollectorRegistry:
    """
    A registry of its own for one service: these collectors, and the process's (CPU,
    memory, descriptors, start time) and Python's.
    """
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


class MetricsService(service.MultiService):
    """
    The ``metrics`` service of a process, parent of what measures (the reactor-lag
    monitor) and of the listener that serves :attr:`registry`.

    :param registry: the ``CollectorRegistry`` served
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        service.MultiService.__init__(self)
        self.setName("metrics")
        #: The ``CollectorRegistry`` served.
        self.registry = registry


class MetricsPage(resource.Resource):
    """
    ``GET /metrics``: the registry in the format the scraper asks for (Prometheus text,
    or OpenMetrics).

    :param registry: the service's ``CollectorRegistry``
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        resource.Resource.__init__(self)
        self._registry = registry

    def render_GET(self, request: server.Request) -> bytes:
        accept = request.getHeader("accept") or ""
        encoder, content_type = choose_encoder(accept)
        request.setHeader("content-type", content_type)
        return encoder(self._registry)


class _QuietSite(AdmittedSite):
    """A Site that does not log each request: a scrape every 15 s is not news."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def metrics_listener(
    registry: CollectorRegistry,
    listen: Listen,
    reactor: Any = None,
    admission: Admission | None = None,
) -> service.Service:
    """
    The listener of ``GET /metrics``, apart from the JSON-RPC ones (metrics are read by
    a scraper on the operator's network, never by a node or a client).  Like those, a
    bind failure aborts start-up.

    :param registry: the service's ``CollectorRegistry``
    :param listen: its :class:`~hero_compute.rpc.listen.Listen`
    :param admission: the process's :class:`~hero_compute.rpc.admission.Admission`,
        to admit its connections by the same limits as the JSON-RPC listeners
    """
    root = resource.Resource()
    root.putChild(b"metrics", MetricsPage(registry))
    site = _QuietSite(root)
    # The page is small and rendered at once; a scraper that stalls is cut off.
    site.timeOut = 30
    site.admission = admission
    return listener_service(
        listen, site, reactor, detail=lambda uri: " (Prometheus metrics at /metrics)"
    )
