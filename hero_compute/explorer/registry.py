"""
The registry of nodes: one record per node id, fed by heartbeats.

Liveness is derived, not stored: a node is online while its last heartbeat is younger
than ``offline_after`` seconds and it has not said goodbye.  So a heartbeat is a single
record update, and no timer per node is needed to expire anybody; the sweep of
:mod:`.liveness` exists only to tell operators, once, when a node goes quiet.

It sees every change to a record, so it keeps what is derived from them (placement
index, summary, events) in step, a line each, never a second walk.  The records
themselves are :mod:`.records`'.
"""

import bisect
from collections.abc import Callable, Collection, Iterable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from hero_compute.rpc.errors import NodeNotFound
from hero_compute.rpc.throttle import Throttle

from .history import HeartbeatHistory
from .placement import PlacementIndex
from .records import KEPT_FIELDS, NEW, Heartbeat, NodeRecord, SharedValues
from .summary import FleetSummary

log = Logger()

#: Node arrivals, returns and moves logged one line each per second; the rest of that
#: second are counted and summed up in one line.  When an explorer restarts, its whole
#: fleet re-registers within one heartbeat interval, and a line per node would cost
#: more CPU than the heartbeats themselves while telling the operator nothing more.
LOG_BURST = 20

#: A node is told to heartbeat this many times per ``offline_after`` (``next_heartbeat``
#: in the answer): it may then miss two heartbeats in a row, to a lost packet or a slow
#: explorer, before it is declared offline.
HEARTBEATS_PER_OFFLINE = 3


class INodeRegistry(Interface):
    """The explorer's book of nodes."""

    clock = Attribute("The ``IReactorTime`` of heartbeat times; Unix seconds.")
    offline_after = Attribute("Seconds of silence after which a node is offline.")
    history = Attribute("The :class:`HeartbeatHistory` of each node's heartbeat times.")

    def heartbeat(heartbeat: Heartbeat) -> tuple[NodeRecord, Collection[str]]:
        """Record a :class:`Heartbeat`; returns ``(record, changed)`` (see Registry)."""

    def leave(node_id: str) -> None:
        """Mark a node offline at once; raises :class:`NodeNotFound`."""

    def get(node_id: str) -> NodeRecord:
        """Returns a :class:`NodeRecord`; raises :class:`NodeNotFound`."""

    def remove(node_id: str) -> None:
        """Forget a node; raises :class:`NodeNotFound`."""

    def records() -> list[NodeRecord]:
        """Returns all :class:`NodeRecord` s."""

    def page(
        after: str | None, limit: int, keep: Callable[[NodeRecord], bool] | None
    ) -> tuple[list[NodeRecord], str | None]:
        """Returns ``(records, next cursor or None)``, in node id order after ``after``."""

    def offline(
        now: float, records: Iterable[NodeRecord] | None = None
    ) -> list[NodeRecord]:
        """Returns the :class:`NodeRecord` s (of ``records``, or all) offline at ``now``."""

    def status(record: NodeRecord) -> str:
        """Returns ``"online"`` or ``"offline"`` for a record, now."""

    def note(fmt: str, **fields: Any) -> None:
        """Log a line about a node, within the registry's budget of lines a second."""

    def flush_log() -> None:
        """Sum up the node events not logged one by one, once their second is over."""

    def __len__() -> int:
        """Returns how many nodes it holds."""


@implementer(INodeRegistry)
@attrs.define
class Registry:
    """
    The in-memory :class:`INodeRegistry`.

    :ivar clock: an ``IReactorTime``; its ``seconds()`` are Unix seconds
    :ivar offline_after: seconds of silence after which a node is offline
    """

    clock: IReactorTime
    offline_after: float
    _nodes: dict = attrs.field(factory=dict)
    # Node ids in order, for paging (explorer.query_nodes): kept sorted as ids come
    # and go, so a page costs a bisect and its own length, never a sort of the fleet.
    _order: list = attrs.field(factory=list, init=False)
    #: The last heartbeat times of each node (explorer.node_history).
    history: HeartbeatHistory = attrs.field(factory=HeartbeatHistory, init=False)
    #: What placement reads (CONTRACT §9), kept as heartbeats arrive; a reservation
    #: lapses after two heartbeat intervals.
    placement: PlacementIndex = attrs.field(
        default=attrs.Factory(
            lambda self: PlacementIndex(
                self.offline_after, 2 * self.offline_after / HEARTBEATS_PER_OFFLINE
            ),
            takes_self=True,
        ),
        init=False,
    )
    #: The fleet's running sums (explorer.summary), kept as records change.
    summary: FleetSummary = attrs.field(
        default=attrs.Factory(
            lambda self: FleetSummary(self.offline_after), takes_self=True
        ),
        init=False,
    )
    #: ``on_event(type, node_id, **data)`` for ``node.online``/``node.offline``, or None.
    on_event: Any = attrs.field(default=None, init=False)
    _shared: SharedValues = attrs.field(factory=SharedValues, init=False)
    # LOG_BURST lines of node events a second, the rest summed up by flush_log.
    _log: Throttle = attrs.field(
        default=attrs.Factory(
            lambda self: Throttle(self.clock, 1.0, LOG_BURST), takes_self=True
        ),
        init=False,
    )

    def heartbeat(self, heartbeat: Heartbeat) -> tuple[NodeRecord, Collection[str]]:
        """
        :return: ``(record, changed)``: the node's :class:`NodeRecord` and the names of
            its fields this heartbeat changed (all of them for a new node)
        """
        now = self.clock.seconds()
        node_id, socket_path = heartbeat.node_id, heartbeat.socket_path
        record = self._nodes.get(node_id)
        self.history.add(node_id, now)
        if record is None:
            shared = self._shared
            # A new node's heartbeat is a full one (the service refuses a delta from a
            # node the registry does not hold): none of its fields is None.
            full: Any = heartbeat
            record = self._nodes[node_id] = NodeRecord(
                node_id=node_id,
                # a node named after its id: one string, not two
                name=node_id if full.name == node_id else full.name,
                socket_path=socket_path,
                transport=heartbeat.transport,
                version=full.version,
                capacity=shared(full.capacity),
                usage=shared(full.usage),
                vm_count=full.vm_count,
                labels=shared(full.labels),
                first_seen=now,
                last_seen=now,
                remote=heartbeat.remote,
            )
            bisect.insort(self._order, node_id)
            self.placement.update(record)
            self.summary.seen(record, NEW, now, new=True)
            self.note(
                "node {node_id} ({name}) joined from {address}",
                node_id=node_id,
                name=record.name,
                address=socket_path,
            )
            if self.on_event is not None:
                self.on_event("node.online", node_id)
            return record, NEW
        changed = []
        vm_count = record.vm_count
        for field in KEPT_FIELDS:
            value = getattr(heartbeat, field)
            # Equal values keep the record's objects: the heartbeat's copies are freed.
            if value is not None and value != getattr(record, field):
                setattr(record, field, self._shared(value))
                changed.append(field)
        if record.transport != heartbeat.transport:
            record.transport = heartbeat.transport
            changed.append("transport")
        old_address = record.socket_path
        if old_address != socket_path:
            record.socket_path = socket_path
            changed.append("socket_path")
        was_offline = record.left or now - record.last_seen > self.offline_after
        record.last_seen = now
        record.left = False
        record.remote = heartbeat.remote
        self.placement.update(record, changed)
        self.summary.seen(record, changed, now)
        if was_offline:
            self.note(
                "node {node_id} ({name}) is back online at {address}",
                node_id=node_id,
                name=record.name,
                address=socket_path,
            )
            if self.on_event is not None:
                self.on_event("node.online", node_id)
        elif old_address != socket_path:
            self.note(
                "node {node_id} moved from {old} to {new}",
                node_id=node_id,
                old=old_address,
                new=socket_path,
            )
        if self.on_event is not None and record.vm_count != vm_count:
            # VMs made or removed other than through this explorer: seen in heartbeats.
            kind = "vm.created" if record.vm_count > vm_count else "vm.deleted"
            self.on_event(kind, node_id, vm_count=record.vm_count, was=vm_count)
        return record, changed

    def note(self, fmt: str, **fields: Any) -> None:
        """
        Log a line about a node, within the same budget of :data:`LOG_BURST` lines a
        second as joins (offline transitions, forgotten nodes, refusals): a fleet that
        goes away at once is summed up, not listed.
        """
        self.flush_log()
        if self._log.offer() is not None:
            log.info(fmt, **fields)

    def flush_log(self) -> None:
        """
        Once the second of the last :data:`LOG_BURST` node-event lines is over, sum up
        in one line the events of it that were not logged one by one.
        """
        if self._log.ready():
            count = self._log.take()
            if count:
                log.info(
                    "{count} more node events (joins, returns, moves, departures) were "
                    "not logged one by one",
                    count=count,
                )

    def leave(self, node_id: str) -> None:
        record = self.get(node_id)
        was_left, record.left = record.left, True
        self.placement.left(node_id)
        self.summary.left(node_id)
        log.info("node {node_id} ({name}) left", node_id=node_id, name=record.name)
        if self.on_event is not None and not was_left:
            self.on_event("node.offline", node_id, reason="left")

    def find(self, node_id: str) -> NodeRecord | None:
        """:return: the node's :class:`NodeRecord`, or None"""
        return self._nodes.get(node_id)

    def load(self, records: Iterable[NodeRecord]) -> None:
        """
        Take records kept from an earlier run (start-up): each is offline until its node
        heartbeats again.

        :param records: :class:`NodeRecord` s
        """
        for record in records:
            record.left = True
            self._nodes[record.node_id] = record
            self.placement.update(record)
            self.summary.loaded()
        self._order = sorted(self._nodes)

    def get(self, node_id: str) -> NodeRecord:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise NodeNotFound(f"no node {node_id!r}") from None

    def remove(self, node_id: str) -> None:
        self.get(node_id)
        del self._nodes[node_id]
        self.placement.remove(node_id)
        self.summary.removed(node_id)
        self.history.pop(node_id, None)
        index = bisect.bisect_left(self._order, node_id)
        del self._order[index]

    def __len__(self) -> int:
        return len(self._nodes)

    def page(
        self,
        after: str | None,
        limit: int,
        keep: Callable[[NodeRecord], bool] | None,
    ) -> tuple[list[NodeRecord], str | None]:
        """
        Records in node id order, after a cursor.

        :param after: the last node id of the previous page, or None to start
        :param limit: at most this many records
        :param keep: ``keep(record) -> bool``, the filter, or None for every record
        :return: ``(records, next cursor or None)``
        """
        order, nodes = self._order, self._nodes
        start = 0 if after is None else bisect.bisect_right(order, after)
        if keep is None:
            # No filter: a slice of the index, no call per record.
            ids = order[start : start + limit]
            more = start + limit < len(order)
            return [nodes[i] for i in ids], (ids[-1] if more and ids else None)
        found = []
        for index in range(start, len(order)):
            record = nodes[order[index]]
            if keep(record):
                found.append(record)
                if len(found) == limit:
                    more = index + 1 < len(order)
                    return found, (record.node_id if more else None)
        return found, None

    def records(self) -> list[NodeRecord]:
        return list(self._nodes.values())

    def offline(
        self, now: float, records: Iterable[NodeRecord] | None = None
    ) -> list[NodeRecord]:
        # One comprehension, no call per record: over 100,000 nodes this is a few ms,
        # where asking each record its status took 20.
        cutoff = now - self.offline_after
        if records is None:
            records = self._nodes.values()
        return [r for r in records if r.left or r.last_seen < cutoff]

    def status(self, record: NodeRecord) -> str:
        return record.status(self.clock.seconds(), self.offline_after)
