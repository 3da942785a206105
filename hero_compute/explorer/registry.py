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
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from hero_compute.rpc.errors import NodeNotFound

from .history import HeartbeatHistory
from .placement import PlacementIndex
from .records import KEPT_FIELDS, NEW, NodeRecord, SharedValues
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

    def heartbeat(heartbeat):
        """Record a :class:`Heartbeat`; returns ``(record, changed)`` (see Registry)."""

    def leave(node_id):
        """Mark a node offline at once; raises :class:`NodeNotFound`."""

    def get(node_id):
        """Returns a :class:`NodeRecord`; raises :class:`NodeNotFound`."""

    def remove(node_id):
        """Forget a node; raises :class:`NodeNotFound`."""

    def records():
        """Returns all :class:`NodeRecord` s."""

    def page(after, limit, keep):
        """Returns ``(records, next cursor or None)``, in node id order after ``after``."""

    def offline(now, records=None):
        """Returns the :class:`NodeRecord` s (of ``records``, or all) offline at ``now``."""

    def status(record):
        """Returns ``"online"`` or ``"offline"`` for a record, now."""

    def note(fmt, **fields):
        """Log a line about a node, within the registry's budget of lines a second."""

    def __len__():
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
    _log_second: int = attrs.field(default=-1, init=False)
    _logged: int = attrs.field(default=0, init=False)
    _unlogged: int = attrs.field(default=0, init=False)

    def heartbeat(self, heartbeat):
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
            record = self._nodes[node_id] = NodeRecord(
                node_id=node_id,
                # a node named after its id: one string, not two
                name=node_id if heartbeat.name == node_id else heartbeat.name,
                socket_path=socket_path,
                transport=heartbeat.transport,
                version=heartbeat.version,
                capacity=shared(heartbeat.capacity),
                usage=shared(heartbeat.usage),
                vm_count=heartbeat.vm_count,
                labels=shared(heartbeat.labels),
                first_seen=now,
                last_seen=now,
                remote=heartbeat.remote,
            )
            bisect.insort(self._order, node_id)
            self.placement.update(record)
            self.summary.seen(record, NEW, now, new=True)
            self._note(
                now,
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
            self._note(
                now,
                "node {node_id} ({name}) is back online at {address}",
                node_id=node_id,
                name=record.name,
                address=socket_path,
            )
            if self.on_event is not None:
                self.on_event("node.online", node_id)
        elif old_address != socket_path:
            self._note(
                now,
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

    def note(self, fmt, **fields):
        """
        Log a line about a node, within the same budget of :data:`LOG_BURST` lines a
        second as joins (offline transitions, forgotten nodes, refusals): a fleet that
        goes away at once is summed up, not listed.
        """
        self._note(self.clock.seconds(), fmt, **fields)

    def _note(self, now, fmt, **fields):
        self.flush_log(now)
        if self._logged < LOG_BURST:
            self._logged += 1
            log.info(fmt, **fields)
        else:
            self._unlogged += 1

    def flush_log(self, now):
        """
        Start a new second of node-event logging, summing up the events of the last
        one that were not logged one by one.

        :param now: the current time
        """
        second = int(now)
        if second == self._log_second:
            return
        if self._unlogged:
            log.info(
                "{count} more node events (joins, returns, moves, departures) were "
                "not logged one by one",
                count=self._unlogged,
            )
        self._log_second = second
        self._logged = 0
        self._unlogged = 0

    def leave(self, node_id):
        record = self.get(node_id)
        was_left, record.left = record.left, True
        self.placement.left(node_id)
        self.summary.left(node_id)
        log.info("node {node_id} ({name}) left", node_id=node_id, name=record.name)
        if self.on_event is not None and not was_left:
            self.on_event("node.offline", node_id, reason="left")

    def find(self, node_id):
        """:return: the node's :class:`NodeRecord`, or None"""
        return self._nodes.get(node_id)

    def load(self, records):
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

    def get(self, node_id):
        try:
            return self._nodes[node_id]
        except KeyError:
            raise NodeNotFound(f"no node {node_id!r}") from None

    def remove(self, node_id):
        self.get(node_id)
        del self._nodes[node_id]
        self.placement.remove(node_id)
        self.summary.removed(node_id)
        self.history.pop(node_id, None)
        index = bisect.bisect_left(self._order, node_id)
        del self._order[index]

    def __len__(self):
        return len(self._nodes)

    def page(self, after, limit, keep):
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

    def records(self):
        return list(self._nodes.values())

    def offline(self, now, records=None):
        # One comprehension, no call per record: over 100,000 nodes this is a few ms,
        # where asking each record its status took 20.
        cutoff = now - self.offline_after
        if records is None:
            records = self._nodes.values()
        return [r for r in records if r.left or r.last_seen < cutoff]

    def status(self, record):
        return record.status(self.clock.seconds(), self.offline_after)
