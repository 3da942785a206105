"""
The explorer's periodic work over a large fleet (the liveness sweep, the record flush,
the node counts) is done in bounded reactor turns and still reaches every node.
"""

import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from hero_compute.explorer.liveness import REPORT_SLICE, LivenessLog
from hero_compute.explorer.record_writer import (
    FLUSH_CHUNK,
    FLUSH_EVERY,
    SHARED_FLUSH_CHUNK,
    NodeRecordWriter,
)
from hero_compute.explorer.records import NodeRecord
from hero_compute.explorer.registry import Registry
from hero_compute.explorer.store.rows import node_rows
from hero_compute.explorer.store.schema import NODE_FIELDS
from hero_compute.rpc.slices import SLICE

from .test_summary import beat as summary_beat


@pytest.fixture
def clock():
    """A clock at a realistic Unix time that numbers the turns it runs."""
    c = Clock()
    c.advance(1_700_000_000)
    c.turn = 0
    later = c.callLater

    def numbered(delay, f, *args, **kwargs):
        def run(*a, **kw):
            c.turn += 1
            return f(*a, **kw)

        return later(delay, run, *args, **kwargs)

    c.callLater = numbered
    return c


def beat(registry, node_id):
    """A full heartbeat of a small node."""
    summary_beat(
        registry,
        node_id,
        capacity={"vcpus": 4},
        usage={"vcpus": 1},
        vm_count=1,
        labels={"zone": "a"},
    )


def per_turn(events):
    """:return: how many events each turn saw"""
    counts = {}
    for turn, *_ in events:
        counts[turn] = counts.get(turn, 0) + 1
    return counts


def test_a_fleet_gone_quiet_is_reported_and_forgotten_in_bounded_turns(clock):
    """Every node of a fleet gone quiet is reported offline once, then forgotten once,
    at most REPORT_SLICE of them per reactor turn, and the counts agree throughout."""
    registry = Registry(clock, 30)
    events = []
    registry.on_event = lambda kind, node_id, **_: events.append(
        (clock.turn, kind, node_id)
    )
    forgotten = []
    svc = LivenessLog(registry, clock, 7.5, forget_after=3600, forgotten=forgotten.append)
    count = 5 * REPORT_SLICE + 3
    for n in range(count):
        beat(registry, f"n{n:05d}")
    events.clear()
    clock.advance(60)
    d = svc.sweep()
    assert d is not None and not d.called  # more than one turn's work
    clock.advance(0)
    assert d.called
    offline = [e for e in events if e[1] == "node.offline"]
    assert sorted(e[2] for e in offline) == [f"n{n:05d}" for n in range(count)]
    turns = per_turn(offline)
    assert len(turns) >= count // REPORT_SLICE and max(turns.values()) <= REPORT_SLICE
    now = clock.seconds()
    assert registry.summary.counts(now) == {"online": 0, "offline": count}
    events.clear()
    svc.sweep()
    clock.advance(0)
    assert events == []  # reported once
    clock.advance(3600)
    svc.sweep()
    clock.advance(0)
    assert sorted(forgotten) == [f"n{n:05d}" for n in range(count)]
    turns = per_turn(e for e in events if e[1] == "node.removed")
    assert sum(turns.values()) == count and max(turns.values()) <= REPORT_SLICE
    assert len(registry) == 0
    assert registry.summary.counts(clock.seconds()) == {"online": 0, "offline": 0}


def test_sweep_of_a_healthy_fleet_looks_at_a_slice_per_turn(clock):
    """A sweep over a fleet all online looks at every record, SLICE per turn, and
    reports nothing."""
    registry = Registry(clock, 30)
    for n in range(3 * SLICE + 1):
        beat(registry, f"n{n:05d}")
    looked = []

    class Looking:
        """The registry, noting each slice looked at and its turn."""

        def __getattr__(self, name):
            return getattr(registry, name)

        def offline(self, now, records=None):
            looked.append((clock.turn, len(records)))
            return registry.offline(now, records)

    events = []
    registry.on_event = lambda *a, **kw: events.append(a)
    LivenessLog(Looking(), clock, 7.5).sweep()
    clock.advance(0)
    assert events == []
    assert [n for _, n in looked] == [SLICE, SLICE, SLICE, 1]
    assert len({turn for turn, _ in looked}) == 4


def test_node_counts_agree_with_a_scan_of_the_registry(clock):
    """The summary's node counts (explorer.info's) are the registry's own, through
    joins, silence, returns, departures, removals and records loaded at start-up."""
    registry = Registry(clock, 30)

    def agree():
        now = clock.seconds()
        offline = len(registry.offline(now))
        assert registry.summary.counts(now) == {
            "online": len(registry) - offline,
            "offline": offline,
        }

    registry.load(
        NodeRecord(**dict(zip(NODE_FIELDS, row, strict=True)))
        for row in [
            (f"old{n}", "o", "unix:///o", "unix", "1", {}, {}, 0, {}, 1.0, 2.0)
            for n in range(3)
        ]
    )
    agree()
    for n in range(10):
        beat(registry, f"n{n}")
        clock.advance(5)
        agree()
    beat(registry, "old1")  # back after a restart
    registry.leave("n3")
    registry.remove("n4")
    registry.remove("old2")
    for step in (0, 9.999, 0.001, 10, 30, 0.5):
        clock.advance(step)
        agree()
    beat(registry, "n3")
    beat(registry, "n0")
    agree()


def test_node_rows_encode_each_records_own_dicts():
    """Encoding a dict once per batch never gives a record another's JSON, even when
    the records are fresh dicts made and dropped one by one."""
    shared = {"vcpus": 4}

    def records():
        for n in range(2000):
            yield {
                "node_id": f"n{n}",
                "name": "x",
                "socket_path": "unix:///x",
                "transport": "unix",
                "version": "1",
                "capacity": shared,
                "usage": {"vcpus": n},  # a fresh dict each time, dropped after
                "vm_count": 0,
                "labels": {"n": str(n)} if n % 2 else {},
                "first_seen": 1.0,
                "last_seen": 2.0,
            }

    rows = node_rows(records())
    at = {f: i for i, f in enumerate(NODE_FIELDS)}
    for n, row in enumerate(rows):
        assert json.loads(row[at["usage"]]) == {"vcpus": n}
        assert json.loads(row[at["capacity"]]) == shared
        assert json.loads(row[at["labels"]]) == ({"n": str(n)} if n % 2 else {})


def record(node_id, name=None):
    """A small node's record."""
    return NodeRecord(
        node_id=node_id,
        name=name or node_id,
        socket_path="unix:///x",
        transport="unix",
        version="1",
        capacity={},
        usage={},
        vm_count=0,
        labels={},
        first_seen=1.0,
        last_seen=2.0,
    )


class RecordingState:
    """Just what a record writer uses of the explorer's state, its store recording
    each transaction and the turn it ran in.  ``refuse(rows)``, when set, may return
    an exception for a transaction to fail with instead (noted in ``refused``); with
    ``held`` a list, store calls wait there until :meth:`run_held`."""

    def __init__(self, clock, shared):
        self.clock = clock
        self.shared = shared
        self.written = []
        self.refused = []
        self.refuse = None
        self.held = None
        self.store = self

    def save_nodes(self, records):
        rows = [dict(r) for r in records]
        error = None if self.refuse is None else self.refuse(rows)
        if error is not None:
            self.refused.append((self.clock.seconds(), [r["node_id"] for r in rows]))
            raise error
        self.written.append((getattr(self.clock, "turn", None), rows))

    def run_on_store(self, f, *args):
        if self.held is not None:
            d = defer.Deferred()
            self.held.append((d, f, args))
            return d
        return defer.succeed(f(*args))

    def run_held(self):
        """Run the store calls held so far, in order, as the store's thread would."""
        while self.held:
            d, f, args = self.held.pop(0)
            d.callback(f(*args))


@pytest.mark.parametrize("shared", [False, True])
def test_flush_writes_every_record_a_chunk_per_turn(clock, shared):
    """A flush of a fleet's changed records writes at most a chunk per reactor turn
    (FLUSH_CHUNK to a local store, SHARED_FLUSH_CHUNK to a shared one), each record
    once, as it was when its chunk was taken."""
    state = RecordingState(clock, shared)
    writer = NodeRecordWriter(state, clock)
    chunk = SHARED_FLUSH_CHUNK if shared else FLUSH_CHUNK
    count = 4 * chunk + 1
    records = [record(f"n{n:05d}", "x") for n in range(count)]
    for each in records:
        writer.save_node(each)
    clock.advance(FLUSH_EVERY)
    assert [len(rows) for _, rows in state.written] == [chunk] * 4 + [1]
    assert len({turn for turn, _ in state.written}) == 5
    written = [row for _, rows in state.written for row in rows]
    assert [row["node_id"] for row in written] == [r.node_id for r in records]
    assert set(written[0]) == set(NODE_FIELDS)
    assert writer.pending == 0 and not clock.getDelayedCalls()
