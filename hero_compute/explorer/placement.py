"""
Placement (CONTRACT §9): which online node a VM goes to.

:class:`PlacementIndex` keeps what placement reads, column by column, updated as
heartbeats arrive: each node's capacity, usage and the explorer's own in-flight
reservations in numpy arrays (one row per node), its last heartbeat time, and for each
label ``key=value`` the set of rows carrying it.  A placement is then a handful of C
loops over the rows (about a millisecond at 100,000 nodes) and a set intersection for
``where``, never a walk over the registry's records.  Why numpy: the score depends on
the request (the free share of each resource *after* placing it), so no order kept in
advance answers "the best node" for every request, and bounding the walk of a sorted
order breaks down in the common fleet of identical empty nodes (every node ties).

Nothing here knows a reactor: the caller passes ``now``.
"""

import collections

import attrs
import numpy as np

#: The resources a request asks for, in the order of the columns.
RESOURCES = ("vcpus", "memory_mb", "disk_gb")

#: The reasons a node is set aside, in the order a node is counted under the first.
REASONS = ("offline", "labels", *RESOURCES)

STRATEGIES = ("spread", "binpack")

_GROW = 1024


class NoFit(Exception):
    """
    No node fits a request.

    :ivar counts: ``{reason: nodes}`` over :data:`REASONS`
    """

    def __init__(self, counts):
        Exception.__init__(self, "no node fits")
        self.counts = counts


@attrs.frozen
class Request:
    """
    What a VM asks of a node, and where it may go.

    :ivar amounts: ``(vcpus, memory_mb, disk_gb)``
    :ivar where: ``{label: value}`` every chosen node must carry
    :ivar avoid: node ids not to choose (nor count)
    :ivar strategy: ``"spread"`` or ``"binpack"``
    """

    amounts: tuple
    where: dict = attrs.field(factory=dict)
    avoid: frozenset = frozenset()
    strategy: str = "spread"

    @classmethod
    def of(cls, vcpus, memory_mb, disk_gb, where=None, avoid=(), strategy=None):
        """:return: the :class:`Request` for the wire's params"""
        return cls(
            (vcpus, memory_mb, disk_gb),
            dict(where or {}),
            frozenset(avoid or ()),
            strategy or "spread",
        )


@attrs.define(eq=False)
class Reservation:
    """
    Resources the explorer has promised a node's next VM, before its heartbeat shows
    them.

    :ivar node_id: the node
    :ivar amounts: ``(vcpus, memory_mb, disk_gb)``
    :ivar usage: the node's usage when it was chosen
    :ivar expires: when it lapses whatever happens (two heartbeat intervals on)
    :ivar created: the create succeeded: the first heartbeat after it whose usage
        differs from :attr:`usage` reflects the VM
    """

    node_id: str
    amounts: tuple
    usage: dict
    expires: float
    created: bool = False
    released: bool = False


def _vector(resources):
    if not resources:
        return (0, 0, 0)
    return tuple(resources.get(key) or 0 for key in RESOURCES)


class PlacementIndex:
    """
    The columns placement reads, one row per node.

    :param offline_after: seconds of silence after which a node is offline
    :param hold: seconds a reservation lasts at most (two heartbeat intervals)
    """

    def __init__(self, offline_after, hold):
        self.offline_after = offline_after
        self.hold = hold
        self._rows = {}
        self._ids = []
        self._spare = []
        size = _GROW
        self._capacity = np.zeros((size, 3))
        self._usage = np.zeros((size, 3))
        self._reserved = np.zeros((size, 3))
        self._seen = np.full(size, -np.inf)
        # A row that is offline whatever its last heartbeat: a node that left, a
        # record loaded at start-up, a spare row.
        self._gone = np.ones(size, dtype=bool)
        self._labels = collections.defaultdict(set)
        self._row_labels = {}
        # Rows by node id order, for ties: rebuilt when a node comes or goes.
        self._rank = np.zeros(size, dtype=np.intp)
        self._rank_stale = True
        self._pending = collections.defaultdict(list)
        self._expiring = collections.deque()

    def __len__(self):
        return len(self._rows)

    def _row(self, node_id):
        row = self._rows.get(node_id)
        if row is not None:
            return row
        if self._spare:
            row = self._spare.pop()
            self._ids[row] = node_id
        else:
            row = len(self._ids)
            self._ids.append(node_id)
            if row >= len(self._seen):
                self._grow()
        self._rows[node_id] = row
        self._rank_stale = True
        return row

    def _grow(self):
        extra = max(_GROW, len(self._seen))
        for name, fill in (
            ("_capacity", 0.0),
            ("_usage", 0.0),
            ("_reserved", 0.0),
        ):
            old = getattr(self, name)
            setattr(self, name, np.concatenate([old, np.full((extra, 3), fill)]))
        self._seen = np.concatenate([self._seen, np.full(extra, -np.inf)])
        self._gone = np.concatenate([self._gone, np.ones(extra, dtype=bool)])
        self._rank = np.concatenate([self._rank, np.zeros(extra, dtype=np.intp)])

    # -- fed by the registry -------------------------------------------------------

    def update(self, record, changed=None, gone=False):
        """
        Take a node's record after a heartbeat (or from the store at start-up).

        :param record: the :class:`~.registry.NodeRecord`
        :param changed: the names of the fields the heartbeat changed, or None for all
        :param gone: the node is offline whatever its last heartbeat (loaded records)
        """
        row = self._row(record.node_id)
        self._seen[row] = record.last_seen
        self._gone[row] = gone or record.left
        if changed is None or "capacity" in changed:
            self._capacity[row] = _vector(record.capacity)
        if changed is None or "usage" in changed:
            self._usage[row] = _vector(record.usage)
            pending = self._pending.get(record.node_id)
            if pending:
                self._reflected(pending, record.usage)
        if changed is None or "labels" in changed:
            self._set_labels(row, record.labels)

    def _set_labels(self, row, labels):
        old = self._row_labels.pop(row, None)
        if old:
            for pair in old.items():
                rows = self._labels[pair]
                rows.discard(row)
                if not rows:
                    del self._labels[pair]
        if labels:
            self._row_labels[row] = dict(labels)
            for pair in labels.items():
                self._labels[pair].add(row)

    def left(self, node_id):
        """A node said goodbye (or was revoked): offline until it heartbeats."""
        row = self._rows.get(node_id)
        if row is not None:
            self._gone[row] = True

    def remove(self, node_id):
        """Forget a node."""
        row = self._rows.pop(node_id, None)
        if row is None:
            return
        self._set_labels(row, None)
        self._gone[row] = True
        self._capacity[row] = self._usage[row] = self._reserved[row] = 0
        self._ids[row] = None
        self._spare.append(row)
        self._rank_stale = True
        for reservation in self._pending.pop(node_id, ()):
            reservation.released = True

    # -- reservations --------------------------------------------------------------

    def reserve(self, node_id, amounts, now):
        """
        Hold ``amounts`` on a node until :meth:`created` and a heartbeat reflecting the
        VM, :meth:`release`, or :attr:`hold` seconds.

        :return: the :class:`Reservation`
        """
        row = self._rows[node_id]
        self._expire(now)
        usage = dict(zip(RESOURCES, (int(x) for x in self._usage[row]), strict=True))
        reservation = Reservation(node_id, tuple(amounts), usage, now + self.hold)
        self._reserved[row] += amounts
        self._pending[node_id].append(reservation)
        self._expiring.append(reservation)
        return reservation

    def created(self, reservation):
        """The VM exists: the next heartbeat showing another usage releases it."""
        reservation.created = True

    def release(self, reservation):
        """Give a reservation back (the create failed, or it is reflected)."""
        if reservation.released:
            return
        reservation.released = True
        row = self._rows.get(reservation.node_id)
        if row is not None:
            self._reserved[row] -= reservation.amounts
            # Sums of floats drift; a node with nothing held holds exactly nothing.
            pending = self._pending[reservation.node_id]
            pending.remove(reservation)
            if not pending:
                del self._pending[reservation.node_id]
                self._reserved[row] = 0

    def _reflected(self, pending, usage):
        for reservation in list(pending):
            if reservation.created and usage != reservation.usage:
                self.release(reservation)

    def _expire(self, now):
        expiring = self._expiring
        while expiring and (expiring[0].released or expiring[0].expires <= now):
            self.release(expiring.popleft())

    def reserved(self, node_id):
        """:return: the ``{resource: amount}`` held on a node now"""
        row = self._rows.get(node_id)
        held = self._reserved[row] if row is not None else (0, 0, 0)
        return dict(zip(RESOURCES, (int(round(x)) for x in held), strict=True))

    # -- placing -------------------------------------------------------------------

    def place(self, request, now):
        """
        The node for ``request`` at time ``now``.

        :param request: a :class:`Request`
        :return: the chosen node id
        :raise NoFit: with the counts of nodes set aside by each reason
        """
        self._expire(now)
        used = len(self._ids)
        if request.where:
            rows = self._matching(request.where)
        else:
            rows = None
        avoid = [self._rows[i] for i in request.avoid if i in self._rows]
        considered = np.ones(used, dtype=bool)
        considered[avoid] = False
        for row in self._spare:
            considered[row] = False
        online = ~self._gone[:used] & (self._seen[:used] >= now - self.offline_after)
        labelled = np.zeros(used, dtype=bool)
        if rows is None:
            labelled[:] = True
        elif rows:
            labelled[np.fromiter(rows, dtype=np.intp, count=len(rows))] = True
        want = np.asarray(request.amounts, dtype=float)
        capacity = self._capacity[:used]
        free = capacity - self._usage[:used] - self._reserved[:used]
        short = free < want
        eligible = considered & online & labelled
        fits = eligible & ~short.any(axis=1)
        if not fits.any():
            raise NoFit(self._counts(considered, online, labelled, short))
        candidates = np.flatnonzero(fits)
        after = free[candidates] - want
        with np.errstate(divide="ignore", invalid="ignore"):
            shares = np.where(
                capacity[candidates] > 0, after / capacity[candidates], np.inf
            )
        scores = shares.min(axis=1)
        best = scores.max() if request.strategy == "spread" else scores.min()
        tied = candidates[scores == best]
        if len(tied) > 1:
            self._fresh_rank()
            tied = tied[[self._rank[tied].argmin()]]
        return self._ids[int(tied[0])]

    def _matching(self, where):
        sets = []
        for pair in where.items():
            rows = self._labels.get(pair)
            if not rows:
                return set()
            sets.append(rows)
        sets.sort(key=len)
        return sets[0].intersection(*sets[1:])

    def _counts(self, considered, online, labelled, short):
        counts = {"offline": int((considered & ~online).sum())}
        left = considered & online
        counts["labels"] = int((left & ~labelled).sum())
        left &= labelled
        for column, key in enumerate(RESOURCES):
            counts[key] = int((left & short[:, column]).sum())
            left &= ~short[:, column]
        return counts

    def _fresh_rank(self):
        if not self._rank_stale:
            return
        ids = self._ids
        order = sorted(range(len(ids)), key=lambda row: ids[row] or "")
        self._rank[order] = np.arange(len(order))
        self._rank_stale = False
