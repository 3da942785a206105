"""
The explorer's registry: upserts, derived liveness, leave and removal.
"""

from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from hero_compute.explorer.liveness import LivenessLog
from hero_compute.explorer.new_ids import NewIds
from hero_compute.explorer.records import Heartbeat
from hero_compute.explorer.registry import INodeRegistry, Registry
from hero_compute.rpc.errors import NodeNotFound


def beat(registry, node_id="n1", transport="unix", address="unix:///tmp/n1.sock"):
    """Record a minimal heartbeat; returns the node's record."""
    record, _ = registry.heartbeat(
        Heartbeat(
            node_id=node_id,
            socket_path=address,
            transport=transport,
            name=node_id,
            version="1",
            capacity={},
            usage={},
            vm_count=0,
            labels={},
        )
    )
    return record


@pytest.fixture
def clock():
    """A clock at a realistic Unix time."""
    c = Clock()
    c.advance(1_700_000_000)
    return c


def test_registry_provides_interface(clock):
    """The registry implements INodeRegistry."""
    assert verifyObject(INodeRegistry, Registry(clock, 30))


def test_heartbeat_upserts_and_keeps_first_seen(clock):
    """A second heartbeat updates the record but keeps first_seen."""
    registry = Registry(clock, 30)
    first = beat(registry)
    first_seen, last_seen = first.first_seen, first.last_seen
    clock.advance(5)
    second = beat(registry, address="tcp://10.0.0.1:9003", transport="tcp")
    assert second.first_seen == first_seen
    assert second.last_seen == last_seen + 5
    assert registry.get("n1").socket_path == "tcp://10.0.0.1:9003"
    assert registry.get("n1").transport == "tcp"
    assert len(registry.records()) == 1


def test_offline_after_silence_and_back(clock):
    """A node is online until offline_after seconds of silence, then back with a beat."""
    registry = Registry(clock, 30)
    record = beat(registry)
    clock.advance(30)
    assert registry.status(registry.get("n1")) == "online"
    clock.advance(0.5)
    assert registry.status(registry.get("n1")) == "offline"
    assert record.to_wire(clock.seconds(), 30)["status"] == "offline"
    beat(registry)
    assert registry.status(registry.get("n1")) == "online"
    assert record.to_wire(clock.seconds(), 30)["status"] == "online"


def test_leave_is_offline_at_once(clock):
    """explorer.leave makes a node offline immediately; a new heartbeat revives it."""
    registry = Registry(clock, 30)
    beat(registry)
    registry.leave("n1")
    assert registry.status(registry.get("n1")) == "offline"
    beat(registry)
    assert registry.status(registry.get("n1")) == "online"


def test_unknown_node_errors(clock):
    """get, leave and remove of an unknown node raise NodeNotFound (-32001)."""
    registry = Registry(clock, 30)
    for op in (registry.get, registry.leave, registry.remove):
        with pytest.raises(NodeNotFound) as e:
            op("nope")
        assert e.value.code == -32001


def test_remove_forgets(clock):
    """remove drops the record."""
    registry = Registry(clock, 30)
    beat(registry)
    registry.remove("n1")
    assert registry.records() == []


@pytest.fixture
def log_events():
    """Every event logged during the test, in order."""
    from twisted.logger import globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def _with(events, text):
    return [e for e in events if text in e.get("log_format", "")]


def test_liveness_log_reports_once(clock, log_events):
    """The sweep logs a node going offline once, not at every sweep."""
    registry = Registry(clock, 3)
    svc = LivenessLog(registry, clock, 1)
    svc.startService()
    beat(registry)
    clock.pump([1] * 10)
    assert len(_with(log_events, "is offline")) == 1
    beat(registry)
    clock.pump([1] * 2)
    assert len(_with(log_events, "is offline")) == 1
    clock.pump([1] * 3)
    assert len(_with(log_events, "is offline")) == 2
    svc.stopService()
    assert not clock.getDelayedCalls()


def test_node_events_are_summed_up_beyond_a_burst(clock, log_events):
    """Joins beyond LOG_BURST in one second are counted, not logged one by one, and
    the count is logged by the next sweep."""
    from hero_compute.explorer.registry import LOG_BURST

    registry = Registry(clock, 30)
    svc = LivenessLog(registry, clock, 1)
    svc.startService()
    for n in range(LOG_BURST + 30):
        beat(registry, node_id=f"n{n}")
    assert len(_with(log_events, "joined from")) == LOG_BURST
    clock.pump([1])
    assert [e["count"] for e in _with(log_events, "more node events")] == [30]
    beat(registry, node_id="late")
    assert log_events[-1]["node_id"] == "late"
    svc.stopService()


def test_offline_lines_share_the_budget(clock, log_events):
    """A fleet that goes quiet at once is logged one by one only up to LOG_BURST a
    second, the rest summed up (200,000 warnings were 34 MB of logs)."""
    from hero_compute.explorer.registry import LOG_BURST

    registry = Registry(clock, 0.5)
    svc = LivenessLog(registry, clock, 1)
    svc.startService()
    for n in range(LOG_BURST * 3):
        beat(registry, node_id=f"n{n}")
    del log_events[:]
    clock.advance(1)  # the sweep: a new second, all 60 nodes are offline
    assert len(_with(log_events, "is offline")) == LOG_BURST
    clock.advance(1)
    assert [e["count"] for e in _with(log_events, "more node events")] == [
        LOG_BURST * 2,
        LOG_BURST * 2,
    ]  # the joins' rest, then the departures' rest
    svc.stopService()


def test_offline_nodes_are_forgotten(clock):
    """A node offline for longer than forget_after is removed and reported."""
    registry = Registry(clock, 1)
    gone = []
    svc = LivenessLog(registry, clock, 1, forget_after=10, forgotten=gone.append)
    beat(registry, node_id="old")
    clock.advance(5)
    beat(registry, node_id="young")
    clock.advance(6)
    svc.sweep()
    assert gone == ["old"] and [r.node_id for r in registry.records()] == ["young"]
    assert registry.page(None, 10, lambda r: True) == ([registry.get("young")], None)


def test_pages_are_stable_and_filtered(clock):
    """Pages walk the fleet in node id order from a cursor, filtered, whatever joins."""
    registry = Registry(clock, 30)
    for n in (5, 1, 9, 3, 7):
        beat(registry, node_id=f"n{n}")
    page, cursor = registry.page(None, 2, lambda r: True)
    assert [r.node_id for r in page] == ["n1", "n3"] and cursor == "n3"
    beat(registry, node_id="n2")  # joins behind the cursor: not seen on later pages
    page, cursor = registry.page(cursor, 2, lambda r: True)
    assert [r.node_id for r in page] == ["n5", "n7"]
    page, cursor = registry.page(cursor, 2, lambda r: True)
    assert [r.node_id for r in page] == ["n9"] and cursor is None
    odd, _ = registry.page(None, 10, lambda r: r.node_id in ("n3", "n9"))
    assert [r.node_id for r in odd] == ["n3", "n9"]


def test_heartbeat_history_is_bounded_and_dropped(clock):
    """
    A node's heartbeat times are kept, oldest first, at most HISTORY of them; a node
    removed (or forgotten) leaves none behind, and one never seen has none.
    """
    from hero_compute.explorer.history import HISTORY

    registry = Registry(clock, 30)
    for _ in range(HISTORY + 5):
        beat(registry)
        clock.advance(2)
    times = registry.history.times("n1")
    assert len(times) == HISTORY
    assert times == [clock.seconds() - 2 * (HISTORY - i) for i in range(HISTORY)]
    assert registry.history.times("nobody") == [] and "nobody" not in registry.history
    beat(registry, "n2")
    registry.remove("n1")
    assert "n1" not in registry.history and registry.history.times("n2") == [
        clock.seconds()
    ]
    log = LivenessLog(registry, clock, 1, forget_after=10)
    clock.advance(100)
    log.sweep()
    assert len(registry) == 0 and not registry.history


def test_offline_agrees_with_each_records_status(clock):
    """The fleet-wide offline list is exactly the records whose status is offline,
    at the boundary too."""
    registry = Registry(clock, 30)
    for n in range(6):
        beat(registry, node_id=f"n{n}")
        clock.advance(10)
    registry.leave("n5")
    for step in (0, 0.5, 9.5, 0.5, 10, 0.25, 30):
        clock.advance(step)
        now = clock.seconds()
        expected = {r.node_id for r in registry.records() if r.status(now, 30) == "offline"}
        assert {r.node_id for r in registry.offline(now)} == expected


def test_large_fleet_is_swept_a_slice_per_turn(clock):
    """Past one slice the sweep goes a slice per reactor turn; a node silent when its
    slice was looked at but back before the sweep ends is not reported, a removed one
    is not forgotten twice."""
    from hero_compute.rpc.slices import SLICE

    registry = Registry(clock, 30)
    forgotten = []
    svc = LivenessLog(registry, clock, 5, forget_after=60, forgotten=forgotten.append)
    count = 2 * SLICE + 10
    for n in range(count):
        beat(registry, node_id=f"n{n:05d}")
    clock.advance(100)  # every node offline, past forget_after
    beat(registry, node_id="n00000")  # back
    d = svc.sweep()
    assert d is not None and not d.called
    beat(registry, node_id="n00001")  # back after its slice was looked at
    registry.remove("n00002")  # removed meanwhile
    clock.advance(0)  # Clock runs the remaining slices
    assert d.called
    assert len(forgotten) == count - 3
    assert {"n00000", "n00001", "n00002"}.isdisjoint(forgotten)
    assert {r.node_id for r in registry.records()} == {"n00000", "n00001"}


def test_metrics_count_nodes_by_status_and_transport(clock):
    """hero_explorer_nodes: each node once, by its status now and its transport."""
    from hero_compute.explorer.metrics import ExplorerCollector

    registry = Registry(clock, 30)
    for n, transport in enumerate(["unix", "tcp", "tcp", "tls", "tcp"]):
        beat(registry, node_id=f"n{n}", transport=transport)
    clock.advance(20)
    beat(registry, node_id="n1", transport="tcp")  # the one tcp node still online later
    registry.leave("n0")
    clock.advance(15)
    family = next(ExplorerCollector(None, registry, None).collect())
    counts = {(s.labels["status"], s.labels["transport"]): s.value for s in family.samples}
    assert counts[("online", "tcp")] == 1
    assert counts[("offline", "tcp")] == 2
    assert counts[("offline", "unix")] == 1 and counts[("offline", "tls")] == 1
    assert counts[("online", "unix")] == 0 and counts[("online", "tls")] == 0
    assert sum(counts.values()) == 5


def test_unfiltered_page_is_the_filtered_page_keeping_all(clock):
    """A page without a filter (an index slice) is the page a keep-all filter gives,
    cursor included, from anywhere, to the end."""
    registry = Registry(clock, 30)
    for n in range(23):
        beat(registry, node_id=f"n{n:03d}")
    for limit in (1, 5, 23, 30):
        for after in (None, "n000", "n010", "n021", "n022", "zzz"):
            assert registry.page(after, limit, None) == registry.page(
                after, limit, lambda r: True
            ), (after, limit)


def test_new_ids_are_counted_in_a_sliding_window():
    """New ids count against their source for 60 s of the injected clock from when
    each came, across any minute boundary, and per source."""
    clock = Clock()
    clock.advance(59.5)  # half a second before a calendar minute ends
    window = NewIds(clock)
    for _ in range(3):
        window.add("192.0.2.1")
    clock.advance(1)  # a new calendar minute: a per-minute count would start again
    window.add("192.0.2.1")
    assert window.count("192.0.2.1") == 4
    assert window.count("192.0.2.2") == 0
    clock.advance(59)  # the first three are 60 s old
    assert window.count("192.0.2.1") == 1
    clock.advance(1)
    assert window.count("192.0.2.1") == 0


def test_explorer_refuses_new_ids_over_the_limit_across_a_minute_boundary():
    """The explorer refuses a source's new ids beyond EXPLORER_NEW_NODES_PER_ADDR in
    any 60 s of its clock, a calendar minute boundary between them or not (-32010)."""
    from hero_compute.explorer.reachable import Refused
    from hero_compute.explorer.service import ExplorerMethods
    from hero_compute.rpc.dispatch import CallContext
    from hero_compute.rpc.limits import Limits

    clock = Clock()
    clock.advance(59.5)  # half a second before a calendar minute ends
    # No store behind it: only the accounts read the trust, at construction.
    trust = SimpleNamespace(store=None, run_on_store=None)
    methods = ExplorerMethods(
        Registry(clock, 30), None, clock, trust, limits=Limits(new_nodes_per_addr=3)
    )
    context = CallContext("tcp", "192.0.2.1:40000", host="192.0.2.1")
    for i in range(3):
        methods._admit(f"new-{i}", context)
    clock.advance(1)  # a new calendar minute: a per-minute count would start again
    with pytest.raises(Refused) as refused:
        methods._admit("new-3", context)
    assert refused.value.code == -32010
    assert "EXPLORER_NEW_NODES_PER_ADDR" in refused.value.message
    assert methods.refusals == {"new_nodes_per_addr": 1}
    other = CallContext("tcp", "192.0.2.2:40000", host="192.0.2.2")
    methods._admit("new-4", other)  # per source
    clock.advance(59)  # the first three are 60 s old
    methods._admit("new-5", context)


def test_new_ids_forget_quiet_sources():
    """A source seen once is dropped after a window: many addresses cannot grow it
    without bound."""
    clock = Clock()
    window = NewIds(clock)
    for i in range(1000):
        window.add(f"198.51.100.{i}")
    clock.advance(61)
    assert window.count("203.0.113.1") == 0
    assert window._seen == {}


def _full(node_id, capacity, labels):
    return Heartbeat(
        node_id=node_id,
        socket_path=f"unix:///tmp/{node_id}.sock",
        transport="unix",
        name=node_id,
        version="1",
        capacity=capacity,
        usage={"vcpus": 1},
        vm_count=0,
        labels=labels,
    )


def test_equal_dicts_of_different_nodes_are_one_object(clock):
    """Equal capacity and labels of two nodes are one dict each; a change is not."""
    registry = Registry(clock, 30)
    a, _ = registry.heartbeat(_full("a", {"vcpus": 4}, {"zone": "z1"}))
    b, _ = registry.heartbeat(_full("b", {"vcpus": 4}, {"zone": "z1"}))
    assert a.capacity is b.capacity and a.labels is b.labels and a.usage is b.usage
    assert a.name is a.node_id
    b, changed = registry.heartbeat(_full("b", {"vcpus": 8}, {"zone": "z1"}))
    assert changed == ["capacity"]
    assert (a.capacity, b.capacity) == ({"vcpus": 4}, {"vcpus": 8})
    nested = {"gpu": {"model": "x"}}
    c, _ = registry.heartbeat(_full("c", nested, {}))
    assert c.capacity is nested
    d, _ = registry.heartbeat(_full("d", {"vcpus": 4.0}, {"zone": "z1"}))
    assert type(d.capacity["vcpus"]) is float  # equal to a's, but what d sent
