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

Long because: the index's columns, the reservations that change them and the scoring
that reads them are one record's invariants (free = capacity - usage - held), kept in
one class.
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

if TYPE_CHECKING:
    from .records import NodeRecord


#: The resources a request asks for, in the order of the columns.
RESOURCES = ("vcpus", "memory_mb", "disk_gb")

#: The reasons a node is set aside, in the order a node is counted under the first.
REASONS = ("offline", "labels", *RESOURCES)

STRATEGIES = ("spread", "binpack")

_GROW = 1024

#: Tied rows compared by node id directly while the fleet's order is stale: 16,384
#: ids take about 0.7 ms, rebuilding the order of 100,000 nodes 28-68 ms (paid on the
#: first placement after a join, which while a fleet registers is every one).
FEW_TIES = 16384


class NoFit(Exception):
    """
    No node fits a request.

    :ivar counts: ``{reason: nodes}`` over :data:`REASONS`
    """

    def __init__(self, counts: dict[str, int]) -> None:
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
    def of(
        cls,
        vcpus: int,
        memory_mb: int,
        disk_gb: int,
        where: dict[str, str] | None = None,
        avoid: Iterable[str] | None = (),
        strategy: str | None = None,
    ) -> Request:
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
    The columns placement reads, one row per node: for each resource its capacity,
    usage, what reservations hold and what is free (capacity - usage - held, kept up to
    date as they change, so a placement subtracts nothing), and per row the last
    heartbeat.  One flat array per column: numpy's
    reductions along a short axis of a two-dimensional array cost several times more.

    :param offline_after: seconds of silence after which a node is offline
    :param hold: seconds a reservation lasts at most (two heartbeat intervals)
    """

    def __init__(self, offline_after: float, hold: float) -> None:
        self.offline_after = offline_after
        self.hold = hold
        self._rows: dict[str, int] = {}
        self._ids: list[Any] = []  # node ids by row; None for a spare row
        self._spare: list[int] = []
        size = _GROW
        self._capacity = [np.zeros(size) for _ in RESOURCES]
        self._usage = [np.zeros(size) for _ in RESOURCES]
        self._held = [np.zeros(size) for _ in RESOURCES]
        self._free = [np.zeros(size) for _ in RESOURCES]
        # The last heartbeat of each row; minus infinity for a row that is offline
        # whatever its last heartbeat (a node that left, a record loaded at start-up,
        # a spare row), so that online is one comparison.
        self._seen = np.full(size, -np.inf)
        self._labels: collections.defaultdict[tuple[str, str], set[int]] = (
            collections.defaultdict(set)
        )
        self._row_labels: dict[int, dict[str, str]] = {}
        # The rows of one label pair as an array, made when a placement asks for it and
        # dropped when a node gains or loses that label.
        self._label_rows: dict[tuple[str, str], np.ndarray] = {}
        # Rows by node id order, for ties: rebuilt when a node comes or goes.
        self._rank = np.zeros(size, dtype=np.intp)
        self._rank_stale = True
        self._pending: collections.defaultdict[str, list[Reservation]] = (
            collections.defaultdict(list)
        )
        self._expiring: collections.deque = collections.deque()

    def __len__(self) -> int:
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

    def _grow(self) -> None:
        extra = max(_GROW, len(self._seen))
        for columns in (self._capacity, self._usage, self._held, self._free):
            for k, column in enumerate(columns):
                columns[k] = np.concatenate([column, np.zeros(extra)])
        self._seen = np.concatenate([self._seen, np.full(extra, -np.inf)])
        self._rank = np.concatenate([self._rank, np.zeros(extra, dtype=np.intp)])

    def _refree(self, row) -> None:
        for k in range(3):
            self._free[k][row] = (
                self._capacity[k][row] - self._usage[k][row] - self._held[k][row]
            )

    # -- fed by the registry -------------------------------------------------------

    def update(
        self, record: NodeRecord, changed: Collection[str] | None = None, gone: bool = False
    ) -> None:
        """
        Take a node's record after a heartbeat (or from the store at start-up).

        :param record: the :class:`~.records.NodeRecord`
        :param changed: the names of the fields the heartbeat changed, or None for all
        :param gone: the node is offline whatever its last heartbeat (loaded records)
        """
        row = self._rows.get(record.node_id)
        if row is None:
            row, changed = self._row(record.node_id), None
        self._seen[row] = -np.inf if gone or record.left else record.last_seen
        if changed is not None and not changed:
            # A steady heartbeat (the ingest's hot path): its time is all there is.
            return
        if changed is None or "capacity" in changed or "usage" in changed:
            for k, amount in enumerate(_vector(record.capacity)):
                self._capacity[k][row] = amount
            for k, amount in enumerate(_vector(record.usage)):
                self._usage[k][row] = amount
            self._refree(row)
            pending = self._pending.get(record.node_id)
            if pending and (changed is None or "usage" in changed):
                self._reflected(pending, record.usage)
        if changed is None or "labels" in changed:
            self._set_labels(row, record.labels)

    def _set_labels(self, row, labels) -> None:
        old = self._row_labels.pop(row, None)
        if old:
            for pair in old.items():
                self._label_rows.pop(pair, None)
                rows = self._labels[pair]
                rows.discard(row)
                if not rows:
                    del self._labels[pair]
        if labels:
            # the record's own dict (never changed in place; shared among nodes)
            self._row_labels[row] = labels
            for pair in labels.items():
                self._label_rows.pop(pair, None)
                self._labels[pair].add(row)

    def left(self, node_id: str) -> None:
        """A node said goodbye (or was revoked): offline until it heartbeats."""
        row = self._rows.get(node_id)
        if row is not None:
            self._seen[row] = -np.inf

    def remove(self, node_id: str) -> None:
        """Forget a node."""
        row = self._rows.pop(node_id, None)
        if row is None:
            return
        self._set_labels(row, None)
        self._seen[row] = -np.inf
        for columns in (self._capacity, self._usage, self._held, self._free):
            for column in columns:
                column[row] = 0
        self._ids[row] = None
        self._spare.append(row)
        self._rank_stale = True
        for reservation in self._pending.pop(node_id, ()):
            reservation.released = True

    # -- reservations --------------------------------------------------------------

    def reserve(self, node_id: str, amounts: Sequence[int], now: float) -> Reservation:
        """
        Hold ``amounts`` on a node until :meth:`created` and a heartbeat reflecting the
        VM, :meth:`release`, or :attr:`hold` seconds.

        :return: the :class:`Reservation`
        """
        row = self._rows[node_id]
        self._expire(now)
        usage = {key: int(self._usage[k][row]) for k, key in enumerate(RESOURCES)}
        reservation = Reservation(node_id, tuple(amounts), usage, now + self.hold)
        for k, amount in enumerate(amounts):
            self._held[k][row] += amount
        self._refree(row)
        self._pending[node_id].append(reservation)
        self._expiring.append(reservation)
        return reservation

    def created(self, reservation: Reservation) -> None:
        """The VM exists: the next heartbeat showing another usage releases it."""
        reservation.created = True

    def release(self, reservation: Reservation) -> None:
        """Give a reservation back (the create failed, or it is reflected)."""
        if reservation.released:
            return
        reservation.released = True
        row = self._rows.get(reservation.node_id)
        if row is None:
            return
        pending = self._pending[reservation.node_id]
        pending.remove(reservation)
        for k, amount in enumerate(reservation.amounts):
            self._held[k][row] -= amount
        if not pending:
            del self._pending[reservation.node_id]
            # Sums of floats drift; a node with nothing held holds exactly nothing.
            for column in self._held:
                column[row] = 0
        self._refree(row)

    def _reflected(self, pending, usage) -> None:
        for reservation in list(pending):
            if reservation.created and usage != reservation.usage:
                self.release(reservation)

    def _expire(self, now) -> None:
        expiring = self._expiring
        while expiring and (expiring[0].released or expiring[0].expires <= now):
            self.release(expiring.popleft())

    def reserved(self, node_id: str) -> dict[str, int]:
        """:return: the ``{resource: amount}`` held on a node now"""
        row = self._rows.get(node_id)
        return {
            key: 0 if row is None else int(round(self._held[k][row]))
            for k, key in enumerate(RESOURCES)
        }

    # -- placing -------------------------------------------------------------------

    def place(self, request: Request, now: float) -> str:
        """
        The node for ``request`` at time ``now``.

        :param request: a :class:`Request`
        :return: the chosen node id
        :raise NoFit: with the counts of nodes set aside by each reason
        """
        self._expire(now)
        used = len(self._ids)
        avoid = [self._rows[i] for i in request.avoid if i in self._rows]
        if request.where:
            # Only the rows carrying every label: usually far fewer than the fleet.
            sub = self._matching(request.where)
            if avoid:
                sub = sub[~np.isin(sub, avoid)]

            def column(array):
                return array[sub]

        else:
            sub = None

            def column(array):
                return array[:used]

        want = request.amounts
        fits = column(self._seen) >= now - self.offline_after
        free = [column(f) for f in self._free]
        for k in range(3):
            fits &= free[k] >= want[k]
        if sub is None and avoid:
            fits[avoid] = False
        if not fits.any():
            raise NoFit(self._counts(request, now, used, avoid))
        with np.errstate(divide="ignore", invalid="ignore"):
            # The free share of the scarcest resource once the VM is there; rows that
            # do not fit get nonsense here and are masked below.
            score = (free[0] - want[0]) / column(self._capacity[0])
            for k in (1, 2):
                np.minimum(
                    score, (free[k] - want[k]) / column(self._capacity[k]), out=score
                )
        if request.strategy == "spread":
            score[~fits] = -np.inf
            best = score.max()
        else:
            score[~fits] = np.inf
            best = score.min()
        tied = np.flatnonzero(score == best)
        if sub is not None:
            tied = sub[tied]
        if len(tied) > 1:
            if self._rank_stale and len(tied) <= FEW_TIES:
                # Their ids compared, rather than the fleet's order rebuilt on the
                # first placement after a join.
                return min(map(self._ids.__getitem__, tied.tolist()))
            self._fresh_rank()
            tied = tied[[self._rank[tied].argmin()]]
        node_id = self._ids[int(tied[0])]
        assert node_id is not None  # a spare row is offline: it never fits
        return node_id

    def _matching(self, where):
        """:return: the rows carrying every label of ``where``, an array"""
        if len(where) == 1:
            (pair,) = where.items()
            rows = self._label_rows.get(pair)
            if rows is None:
                found = self._labels.get(pair, ())
                rows = np.fromiter(found, dtype=np.intp, count=len(found))
                if found:
                    self._label_rows[pair] = rows
            return rows
        sets = []
        for pair in where.items():
            matching = self._labels.get(pair)
            if not matching:
                return np.zeros(0, dtype=np.intp)
            sets.append(matching)
        sets.sort(key=len)
        common = sets[0].intersection(*sets[1:])
        return np.fromiter(common, dtype=np.intp, count=len(common))

    def _counts(self, request, now, used, avoid):
        """Why each node was set aside: only when nothing fits, so a walk of it all."""
        considered = np.ones(used, dtype=bool)
        considered[avoid] = False
        considered[self._spare] = False
        online = self._seen[:used] >= now - self.offline_after
        counts = {"offline": int((considered & ~online).sum())}
        left = considered & online
        labelled = np.zeros(used, dtype=bool)
        if request.where:
            labelled[self._matching(request.where)] = True
        else:
            labelled[:] = True
        counts["labels"] = int((left & ~labelled).sum())
        left &= labelled
        for k, key in enumerate(RESOURCES):
            short = self._free[k][:used] < request.amounts[k]
            counts[key] = int((left & short).sum())
            left &= ~short
        return counts

    def _fresh_rank(self) -> None:
        if not self._rank_stale:
            return
        ids = self._ids
        order = sorted(range(len(ids)), key=lambda row: ids[row] or "")
        self._rank[order] = np.arange(len(order))
        self._rank_stale = False
