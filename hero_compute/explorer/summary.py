"""
The fleet's summary (``explorer.summary``, CONTRACT §11): nodes online and offline, and
the VMs, capacity, usage and labels of the online ones, kept up to date as heartbeats
arrive and nodes leave, go quiet or are removed, so that answering costs the size of the
answer, never a read of the fleet.

A node goes offline by silence without any event: the online nodes are kept in the order
of their last heartbeat (a heartbeat moves its node to the end), so those gone quiet are
at the front, and are taken out of the sums each once: by the liveness sweep, a slice
per turn, and by a read, at most :data:`READ_EXPIRY` of them.  A read counts the rest
without moving them: the order is kept in chunks of :data:`CHUNK` nodes, and a chunk
whose latest heartbeat is old is quiet as a whole, counted by its size.  So a whole
fleet gone quiet (~140 ms to take out at 100,000 nodes) costs a read a slice of that.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .records import NodeRecord


#: The resources summed, in the order of a node's contribution.
RESOURCES = ("vcpus", "memory_mb", "disk_gb")

#: Distinct contributions (and parts of them) kept to share among nodes.
SHARED_PARTS = 4096

#: Heartbeat fields a node's contribution depends on.
COUNTED = frozenset({"capacity", "usage", "vm_count", "labels"})

#: Online nodes per chunk of the heartbeat order: a read looks at one chunk's nodes one by
#: one at most (the chunk that the cutoff falls in), and counts the others by their size.
CHUNK = 512

#: Nodes gone quiet that one read takes out of the sums at most, ~1.5 µs each; the
#: liveness sweep takes out the rest, :data:`~.liveness.REPORT_SLICE` a turn.
READ_EXPIRY = 500


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


class _Sums:
    """Capacity, usage, VMs and labels summed over contributions."""

    __slots__ = ("capacity", "labels", "usage", "vms")

    def __init__(self) -> None:
        self.vms = 0
        self.capacity = [0] * len(RESOURCES)
        self.usage = [0] * len(RESOURCES)
        self.labels: dict[str, dict[str, int]] = {}

    def add(self, part: tuple[Any, ...], sign: int) -> None:
        """Add (``sign`` 1) or take out (-1) one node's contribution."""
        cap, use, vms, labels = part
        for i in range(len(RESOURCES)):
            self.capacity[i] += sign * cap[i]
            self.usage[i] += sign * use[i]
        self.vms += sign * vms
        for key, value in labels:
            values = self.labels.setdefault(key, {})
            count = values.get(value, 0) + sign
            if count:
                values[value] = count
            else:
                del values[value]
                if not values:
                    del self.labels[key]

    def answer(self, nodes: dict[str, int]) -> dict[str, Any]:
        """:return: :meth:`FleetSummary.answer`'s dict, a copy, with ``nodes``"""
        return {
            "nodes": nodes,
            "vms": self.vms,
            "capacity": dict(zip(RESOURCES, self.capacity, strict=True)),
            "usage": dict(zip(RESOURCES, self.usage, strict=True)),
            "labels": {key: dict(values) for key, values in self.labels.items()},
        }


class _Chunk:
    """Online nodes next to each other in the heartbeat order, at most :data:`CHUNK`."""

    __slots__ = ("filled", "latest", "nodes")

    def __init__(self) -> None:
        #: node id -> (last heartbeat, contribution), oldest heartbeat first.
        self.nodes: dict[str, tuple[float, Any]] = {}
        #: The latest heartbeat put in: older than the cutoff, the chunk is all quiet.
        self.latest = -math.inf
        #: Nodes put in, those gone since included (a chunk is filled once).
        self.filled = 0


class FleetSummary:
    """
    The running sums.  The registry tells it of every change (:meth:`seen`,
    :meth:`left`, :meth:`removed`, :meth:`loaded`); a read (:meth:`counts`,
    :meth:`answer`) takes out a slice of the nodes gone quiet and counts the rest, and
    the liveness sweep takes them out (:meth:`expire`).

    :param offline_after: seconds without a heartbeat after which a node is offline
    """

    def __init__(self, offline_after: float) -> None:
        self._offline_after = offline_after
        # The online nodes (those gone quiet not yet taken out among them) in chunks,
        # oldest heartbeat first, and each one's chunk.
        self._chunks: collections.deque[_Chunk] = collections.deque()
        self._where: dict[str, _Chunk] = {}
        self._offline = 0
        self._sums = _Sums()
        # One object for equal contributions and their parts: a fleet's nodes mostly
        # share capacity, labels and often usage, and a contribution per node cost some
        # 260 bytes at 100,000 nodes.  Bounded: past it, cleared (only sharing is lost).
        self._shared: dict[Any, Any] = {}

    def _share(self, part: tuple[Any, ...]) -> tuple[Any, ...]:
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
        where = self._where
        chunk = where.get(node_id)
        if chunk is None:
            if not new:
                self._offline -= 1
            part = self._share(contribution(record))
            self._sums.add(part, 1)
        else:
            part = chunk.nodes.pop(node_id)[1]
            if not chunk.nodes:
                self._emptied(chunk)
            if not COUNTED.isdisjoint(changed):
                self._sums.add(part, -1)
                part = self._share(contribution(record))
                self._sums.add(part, 1)
        # At the end of the heartbeat order (inline: this is every heartbeat's path).
        chunks = self._chunks
        if not chunks or chunks[-1].filled >= CHUNK:
            chunks.append(_Chunk())
        chunk = chunks[-1]
        chunk.nodes[node_id] = (now, part)
        chunk.filled += 1
        if now > chunk.latest:
            chunk.latest = now
        where[node_id] = chunk

    def _emptied(self, chunk: _Chunk) -> None:
        """The last node of ``chunk`` left it: let its table go, and empty chunks first."""
        # A steady fleet empties its chunks in order, one heartbeat interval after
        # they were filled: kept until all quiet, they were 2.3 MB more at 100,000.
        chunk.nodes = {}
        chunks = self._chunks
        while len(chunks) > 1 and not chunks[0].nodes:
            chunks.popleft()

    def _pop(self, node_id: str) -> tuple[Any, ...] | None:
        """Take a node out of the order: :return: its contribution, None if not in it"""
        chunk = self._where.pop(node_id, None)
        if chunk is None:
            return None
        part = chunk.nodes.pop(node_id)[1]
        if not chunk.nodes:
            self._emptied(chunk)
        return part

    def left(self, node_id: str) -> None:
        """
        A node said goodbye, or was revoked: offline at once.

        :param node_id: the node's id
        """
        part = self._pop(node_id)
        if part is not None:
            self._sums.add(part, -1)
            self._offline += 1

    def removed(self, node_id: str) -> None:
        """
        A node was forgotten.

        :param node_id: the node's id
        """
        part = self._pop(node_id)
        if part is None:
            self._offline -= 1
        else:
            self._sums.add(part, -1)

    def loaded(self, count: int = 1) -> None:
        """
        ``count`` nodes were loaded from the store at start-up: offline until heard.

        :param count: how many
        """
        self._offline += count

    def expire(self, now: float, limit: int | None = None) -> None:
        """
        Take out of the sums the nodes whose last heartbeat is older than
        ``offline_after``: those of the chunks all quiet, then those of the first chunk
        that is not.

        :param now: the current time
        :param limit: take out at most this many (a slice of the liveness sweep's, so
            that a fleet gone quiet at once is not all taken out in one turn)
        """
        cutoff = now - self._offline_after
        chunks, where, sums = self._chunks, self._where, self._sums
        left = -1 if limit is None else limit
        while chunks and left:
            chunk = chunks[0]
            nodes = chunk.nodes
            whole = chunk.latest < cutoff
            quiet: list[str] = []
            for node_id, (last, _) in nodes.items():
                if (last >= cutoff and not whole) or len(quiet) == left:
                    break
                quiet.append(node_id)
            for node_id in quiet:
                sums.add(nodes.pop(node_id)[1], -1)
                del where[node_id]
            self._offline += len(quiet)
            left -= len(quiet)
            if not whole or nodes:
                return  # the first chunk not all quiet, or the limit, came first
            chunks.popleft()

    def _quiet(self, cutoff: float) -> int:
        """
        :return: the online nodes still held whose last heartbeat is older than
            ``cutoff``, counted without moving them: a chunk all quiet by its size, the
            first that is not one by one, up to its first node heard since
        """
        quiet = 0
        for chunk in self._chunks:
            if chunk.latest < cutoff:
                quiet += len(chunk.nodes)
                continue
            for last, _ in chunk.nodes.values():
                if last >= cutoff:
                    break
                quiet += 1
            break
        return quiet

    def counts(self, now: float) -> dict[str, int]:
        """
        :param now: the current time
        :return: ``{"online", "offline"}``: the node counts, at the cost of at most
            :data:`READ_EXPIRY` nodes gone quiet taken out and a count of the others,
            never a read of the fleet
        """
        self.expire(now, READ_EXPIRY)
        quiet = self._quiet(now - self._offline_after)
        return {"online": len(self._where) - quiet, "offline": self._offline + quiet}

    def _newest(self, count: int) -> Iterator[tuple[Any, ...]]:
        """:return: the contributions of the ``count`` nodes heard last, newest first"""
        for chunk in reversed(self._chunks):
            for _, part in reversed(chunk.nodes.values()):
                if not count:
                    return
                count -= 1
                yield part

    def answer(self, now: float) -> dict[str, Any]:
        """
        The summary.  When more nodes went quiet than a read takes out
        (:data:`READ_EXPIRY`), the sums are those of the nodes still online, summed
        anew if there are no more of them than that; else they hold the quiet ones not
        yet taken out, until the liveness sweep does (within a sweep's interval).

        :param now: the current time
        :return: ``{"nodes": {"online", "offline"}, "vms", "capacity", "usage",
            "labels": {key: {value: count}}}``, the sums over online nodes
        """
        nodes = self.counts(now)
        online = nodes["online"]
        if online == len(self._where) or online > READ_EXPIRY:
            return self._sums.answer(nodes)
        # The quiet ones are the first in the order, the online ones the last.
        sums = _Sums()
        for part in self._newest(online):
            sums.add(part, 1)
        return sums.answer(nodes)
