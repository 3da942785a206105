"""
The node's Prometheus metrics, read at scrape time from the objects its methods use:
the VM manager (VMs by state, capacity and usage, QEMU starts), the heartbeat loops
(each explorer's state and the age of its last accepted heartbeat), the HTTP factory
(connections, refusals) and the reactor's lag.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet import defer

from hero_compute.rpc.lag import ReactorLag
from hero_compute.rpc.metrics import (
    MetricsService,
    TransportCollector,
    metrics_listener,
    metrics_registry,
)

from .vms import STATES

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from twisted.internet.interfaces import IReactorTime

    from hero_compute.rpc.http_server import RpcHTTPFactory
    from hero_compute.rpc.listen import Listen

    from .heartbeat import HeartbeatLoop
    from .vms import IVmManager


class _Node(Protocol):
    """What the metrics read of the node (node/service.py's NodeService, which
    imports this module)."""

    @property
    def vms(self) -> IVmManager: ...

    @property
    def heartbeats(self) -> Sequence[HeartbeatLoop]: ...


#: Bytes per unit of the wire's ``memory_mb`` and ``disk_gb``: Prometheus wants bytes.
_BYTES = {"memory_mb": 2**20, "disk_gb": 2**30}


def _settled(result):
    """
    A result that is already there: the VM list (a Deferred of the QEMU manager's is
    always fired); None if it is not, or failed.
    """
    box: list[object] = []
    defer.maybeDeferred(lambda: result).addBoth(box.append)
    return box[0] if box and isinstance(box[0], list) else None


class NodeCollector:
    """
    The node's own metric families.

    :param node: the :class:`~hero_compute.node.service.NodeService`
    :param clock: the ``IReactorTime`` heartbeats are stamped with
    """

    def __init__(self, node: _Node, clock: IReactorTime) -> None:
        self._node = node
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        """The metric families, read now."""
        vms = self._node.vms
        records = _settled(vms.list())
        if records is not None:
            counts = collections.Counter(vm.state for vm in records)
            family = GaugeMetricFamily(
                "hero_node_vms", "VMs of this node, by state", labels=["state"]
            )
            for state in STATES:
                family.add_metric([state], counts[state])
            yield family
        for kind, doc, amounts in (
            ("capacity", "this host has", vms.capacity()),
            ("usage", "this node's VMs are given", vms.usage()),
        ):
            yield GaugeMetricFamily(
                f"hero_node_{kind}_vcpus", f"Virtual CPUs {doc}", value=amounts["vcpus"]
            )
            for key, name in (("memory_mb", "memory"), ("disk_gb", "disk")):
                yield GaugeMetricFamily(
                    f"hero_node_{kind}_{name}_bytes",
                    f"Bytes of {name} {doc}",
                    value=amounts[key] * _BYTES[key],
                )

        up = GaugeMetricFamily(
            "hero_node_explorer_up",
            "1 while heartbeats to this explorer are accepted, 0 while failing",
            labels=["explorer"],
        )
        age = GaugeMetricFamily(
            "hero_node_explorer_last_ok_age_seconds",
            "Seconds since this explorer last accepted a heartbeat (absent until one is)",
            labels=["explorer"],
        )
        now = self._clock.seconds()
        for loop in self._node.heartbeats:
            explorer = loop.state
            up.add_metric([explorer.address], 1 if explorer.state == "ok" else 0)
            if explorer.last_ok is not None:
                age.add_metric([explorer.address], max(0.0, now - explorer.last_ok))
        yield up
        yield age

        # The QEMU manager counts its starts; another manager (a test's) may not.
        starts = getattr(vms, "starts", None)
        if starts is not None:
            counted: Any = vms
            yield CounterMetricFamily(
                "hero_node_qemu_starts", "VMs whose QEMU started and ran", value=starts
            )
            yield CounterMetricFamily(
                "hero_node_qemu_start_failures",
                "VM starts that failed (QEMU, its base image or the state directory)",
                value=counted.start_failures,
            )


def make_metrics(
    *,
    listen: Listen,
    node: _Node,
    factory: RpcHTTPFactory,
    clock: IReactorTime,
    reactor: Any = None,
) -> MetricsService:
    """
    The node's metrics: ``GET /metrics`` on its own listener, and the reactor's lag.

    :param listen: the :class:`~hero_compute.rpc.listen.Listen` to serve them on
    :param node: the :class:`~hero_compute.node.service.NodeService`
    :param factory: the HTTP factory of the JSON-RPC listeners
    :param clock: the ``IReactorTime`` to measure the lag with
    :return: a ``MultiService``; its ``registry`` is the ``CollectorRegistry``
    """
    lag = ReactorLag(clock)
    metrics = MetricsService(
        metrics_registry(NodeCollector(node, clock), TransportCollector(factory), lag)
    )
    lag.setServiceParent(metrics)
    metrics_listener(
        metrics.registry, listen, reactor, factory.admission.sibling()
    ).setServiceParent(metrics)
    return metrics
