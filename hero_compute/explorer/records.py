"""
A node as the explorer knows it: one :class:`Heartbeat` as accepted, the
:class:`NodeRecord` the :class:`~.registry.Registry` keeps from them, and
:class:`StaleSession`, the refusal of a delta heartbeat it cannot apply.
"""

from typing import Any

import attrs

from hero_compute.rpc.errors import InvalidParams


@attrs.frozen
class Heartbeat:
    """
    One heartbeat as the explorer accepted it: built once per ``explorer.heartbeat``
    call, the address in canonical form.

    A full heartbeat has every field, defaults filled in.  In a delta heartbeat (one
    that names the explorer's session, see :mod:`.service`) a field left as None keeps
    the node's last accepted value; only a node the registry holds may send one.

    :ivar socket_path: the node's address URI
    :ivar transport: ``"unix"``, ``"tcp"`` or ``"tls"``: how the heartbeat arrived
    :ivar remote: it came from another host (a non-loopback peer): the proxy may then
        not be aimed at this host's own addresses (CONTRACT §6)
    """

    node_id: str
    socket_path: str
    transport: str
    name: str | None
    version: str | None
    capacity: dict | None
    usage: dict | None
    vm_count: int | None
    labels: dict | None
    remote: bool = False


#: Distinct dicts a :class:`SharedValues` keeps to share.
SHARED_VALUES = 4096


class SharedValues:
    """
    One dict object for equal ``capacity``, ``usage`` and ``labels`` of different
    nodes: a fleet's nodes mostly report the same few, and each node's own copy (its
    keys' strings included, which JSON decoding makes anew for every heartbeat) cost
    some 600 bytes at 100,000 nodes.  A record's dicts are never changed in place (a
    heartbeat replaces them), so sharing is safe.  Bounded: past
    :data:`SHARED_VALUES` distinct values it starts over (only sharing is lost).
    """

    def __init__(self) -> None:
        self._kept: dict[tuple[tuple[Any, Any, type], ...], dict[Any, Any]] = {}

    def __call__(self, value: Any) -> Any:
        """:return: ``value``, or an equal dict already held (other values as given)"""
        if type(value) is not dict:
            return value
        try:
            # Types too: 16 and 16.0 are equal, but a node's answer shows what it sent.
            key = tuple((k, v, type(v)) for k, v in value.items())
            kept = self._kept.get(key)
        except TypeError:  # a value that is not hashable (a nested dict): its own
            return value
        if kept is None:
            if len(self._kept) >= SHARED_VALUES:
                self._kept.clear()
            kept = self._kept[key] = value
        return kept


#: The fields a heartbeat may leave out when the explorer holds them (a delta).
KEPT_FIELDS = ("name", "version", "capacity", "usage", "vm_count", "labels")

#: What a new node's first heartbeat changed: everything.
NEW = (*KEPT_FIELDS, "transport", "socket_path")


@attrs.define(eq=False)
class NodeRecord:
    """
    What the explorer knows of one node, from its last heartbeat.

    Only the :class:`Registry` changes a record (in place: a steady heartbeat then
    allocates nothing); everyone else reads it.

    :ivar socket_path: the node's address URI, as it reported it (canonical form)
    :ivar transport: ``"unix"``, ``"tcp"`` or ``"tls"``: how its last heartbeat arrived
    :ivar left: the node said goodbye (``explorer.leave``) after its last heartbeat, or
        the record was loaded at start-up and the node has not heartbeated since
    :ivar remote: its last heartbeat came from another host
    """

    node_id: str
    name: str
    socket_path: str
    transport: str
    version: str
    capacity: dict
    usage: dict
    vm_count: int
    labels: dict
    first_seen: float
    last_seen: float
    left: bool = False
    remote: bool = False

    def status(self, now: float, offline_after: float) -> str:
        """
        :return: ``"online"`` or ``"offline"`` at time ``now``
        """
        if self.left or now - self.last_seen > offline_after:
            return "offline"
        return "online"

    def to_wire(self, now: float, offline_after: float) -> dict[str, Any]:
        """:return: the NodeInfo dict at time ``now``"""
        return {
            "node_id": self.node_id,
            "name": self.name,
            "socket_path": self.socket_path,
            "status": self.status(now, offline_after),
            "last_seen": self.last_seen,
            "first_seen": self.first_seen,
            "transport": self.transport,
            "version": self.version,
            "capacity": self.capacity,
            "usage": self.usage,
            "vm_count": self.vm_count,
            "labels": self.labels,
        }


class StaleSession(InvalidParams):
    """-32602 for a delta heartbeat the explorer cannot apply: the node resends it whole."""

    reason = "stale_session"

    def __init__(self, node_id: str) -> None:
        InvalidParams.__init__(
            self,
            f"explorer.heartbeat: this explorer holds no record of {node_id} for that "
            "session (it restarted, or forgot the node): send the full heartbeat",
            data={"resend": "full"},
        )
