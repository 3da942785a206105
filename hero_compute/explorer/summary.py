"""
The fleet's summary (``explorer.summary``, CONTRACT §11): nodes online and offline, and
the VMs, capacity, usage and labels of the online ones, kept up to date as heartbeats
arrive and nodes leave, go quiet or are removed, so that answering costs the size of the
answer, never a read of the fleet.

A node goes offline by silence without any event: the online nodes are kept in the order
of their last heartbeat (a heartbeat moves its node to the end), so those gone quiet are
at the front, and are taken out before each answer, each once.
"""

from __future__ import annotations

import collections
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .records import NodeRecord


#: The resources summed, in the order of a node's contribution.
RESOURCES = ("vcpus", "memory_mb", "disk_gb")

#: Distinct contributions (and parts of them) kept to share among nodes.
SHARED_PARTS = 4096

#: Heartbeat fields a node's contribution depends on.
COUNTED = frozenset({"capacity", "usage", "vm_count", "labels"})


def _number(value: object) -> int | float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def contribution(record: NodeRecord) -> tuple[Any, ...]:
    """
    What one online node adds to the sums.

    :param record: a :class:`~hero_compute.explorer.records.NodeRecord`
    :return: ``(capacity tuple, usage tuple, vm_count, labels items tuple)``
    """
    cap, use = record.capacity or {}, record.usage or {}
    return (
        tuple(_number(cap.get(key)) for key in RESOURCES),
        tuple(_number(use.get(key)) for key in RESOURCES),
        _number(record.vm_count),
        tuple((record.labels or {}).items()),
    )


class FleetSummary:
    """
    The running sums.  The registry tells it of every change (:meth:`seen`,
    :meth:`left`, :meth:`removed`, :meth:`loaded`); :meth:`answer` expires the nodes
    gone quiet and answers.

    :param offline_after: seconds without a heartbeat after which a node is offline
    """

    def __init__(self, offline_after: float) -> None:
        self._offline_after = offline_after
        # node id -> (last heartbeat, contribution), oldest heartbeat first.
        self._online: collections.OrderedDict[str, tuple[float, Any]] = (
            collections.OrderedDict()
        )
        self._offline = 0
        self._vms = 0
        self._capacity = [0] * len(RESOURCES)
        self._usage = [0] * len(RESOURCES)
        self._labels: dict[str, dict[str, int]] = {}
        # One object for equal contributions and their parts: a fleet's nodes mostly
        # share capacity, labels and often usage, and a contribution per node cost some
        # 260 bytes at 100,000 nodes.  Bounded: past it, cleared (only sharing is lost).
        self._shared: dict[Any, Any] = {}

    def _share(self, part):
        cap, use, vms, _ = part
        if not all(type(x) is int for x in (*cap, *use, vms)):
            # 16 and 16.0 are equal: sharing would change a sum's type (and its JSON).
            return part
        shared = self._shared
        if len(shared) >= SHARED_PARTS:
            shared.clear()
        try:
            part = tuple(shared.setdefault(p, p) for p in part)
            return shared.setdefault(part, part)
        except TypeError:  # a label value that is not hashable: kept as it is
            return part

    def _add(self, part, sign) -> None:
        cap, use, vms, labels = part
        for i in range(len(RESOURCES)):
            self._capacity[i] += sign * cap[i]
            self._usage[i] += sign * use[i]
        self._vms += sign * vms
        for key, value in labels:
            values = self._labels.setdefault(key, {})
            count = values.get(value, 0) + sign
            if count:
                values[value] = count
            else:
                del values[value]
                if not values:
                    del self._labels[key]

    def seen(
        self, record: NodeRecord, changed: Collection[str], now: float, new: bool = False
    ) -> None:
        """
        A heartbeat was accepted (the record already holds it).

        :param record: the node's :class:`~hero_compute.explorer.records.NodeRecord`
        :param changed: the names of the fields the heartbeat changed
        :param now: its time
        :param new: the node was not known before
        """
        node_id = record.node_id
        held = self._online.get(node_id)
        if held is None:
            if not new:
                self._offline -= 1
            part = self._share(contribution(record))
            self._add(part, 1)
        elif COUNTED.isdisjoint(changed):
            part = held[1]
            self._online.move_to_end(node_id)
        else:
            self._add(held[1], -1)
            part = self._share(contribution(record))
            self._add(part, 1)
            self._online.move_to_end(node_id)
        self._online[node_id] = (now, part)

    def left(self, node_id: str) -> None:
        """A node said goodbye, or was revoked: offline at once."""
        held = self._online.pop(node_id, None)
        if held is not None:
            self._add(held[1], -1)
            self._offline += 1

    def removed(self, node_id: str) -> None:
        """A node was forgotten."""
        held = self._online.pop(node_id, None)
        if held is None:
            self._offline -= 1
        else:
            self._add(held[1], -1)

    def loaded(self, count: int = 1) -> None:
        """``count`` nodes were loaded from the store at start-up: offline until heard."""
        self._offline += count

    def expire(self, now: float, limit: int | None = None) -> None:
        """
        Take out the nodes whose last heartbeat is older than ``offline_after``.

        :param limit: take out at most this many (a slice of the liveness sweep's, so
            that a fleet gone quiet at once is not all taken out in one turn)
        """
        cutoff = now - self._offline_after
        online = self._online
        while online and (limit is None or limit > 0):
            if limit is not None:
                limit -= 1
            node_id, (last, part) = next(iter(online.items()))
            if last >= cutoff:
                return
            online.popitem(last=False)
            self._add(part, -1)
            self._offline += 1

    def counts(self, now: float) -> dict[str, int]:
        """
        :param now: the current time
        :return: ``{"online", "offline"}``: the node counts, at the cost of the nodes
            gone quiet since the last call, not of a read of the fleet
        """
        self.expire(now)
        return {"online": len(self._online), "offline": self._offline}

    def answer(self, now: float) -> dict[str, Any]:
        """
        :param now: the current time
        :return: ``{"nodes": {"online", "offline"}, "vms", "capacity", "usage",
            "labels": {key: {value: count}}}``, the sums over online nodes
        """
        return {
            "nodes": self.counts(now),
            "vms": self._vms,
            "capacity": dict(zip(RESOURCES, self._capacity, strict=True)),
            "usage": dict(zip(RESOURCES, self._usage, strict=True)),
            "labels": {key: dict(values) for key, values in self._labels.items()},
        }
