"""
The placement index and its scoring (CONTRACT §9), without a reactor: records fed as
the registry feeds them, ``now`` passed in.
"""

import pytest

from hero_compute.explorer.placement import FEW_TIES, NoFit, PlacementIndex, Request
from hero_compute.explorer.records import NodeRecord

BIG = {"vcpus": 16, "memory_mb": 32768, "disk_gb": 1000}
SMALL = {"vcpus": 4, "memory_mb": 8192, "disk_gb": 100}
IDLE = {"vcpus": 0, "memory_mb": 0, "disk_gb": 0}


def record(node_id, capacity, usage=IDLE, labels=None, seen=100.0, left=False):
    """A node record as the registry holds it."""
    return NodeRecord(
        node_id=node_id,
        name=f"name-{node_id}",
        socket_path="unix:///x.sock",
        transport="unix",
        version="",
        capacity=dict(capacity),
        usage=dict(usage),
        vm_count=0,
        labels=dict(labels or {}),
        first_seen=seen,
        last_seen=seen,
        left=left,
    )


def index(*records):
    """An index holding ``records`` (offline after 30 s, reservations held 20 s)."""
    placement = PlacementIndex(30.0, 20.0)
    for r in records:
        placement.update(r)
    return placement


def req(vcpus=1, memory_mb=1024, disk_gb=10, **kw):
    """A request."""
    return Request.of(vcpus, memory_mb, disk_gb, **kw)


def test_spread_picks_the_most_free_share_of_the_scarcest_resource():
    """spread: the node whose scarcest resource keeps the largest free share wins."""
    placement = index(
        record("a", BIG, {"vcpus": 12, "memory_mb": 0, "disk_gb": 0}),
        record("b", SMALL),
        record("c", BIG, {"vcpus": 0, "memory_mb": 0, "disk_gb": 900}),
    )
    # a: cpu (16-12-1)/16 = 0.19; b: cpu 3/4 = 0.75; c: disk 90/1000 = 0.09
    assert placement.place(req(), 100.0) == "b"


def test_binpack_picks_the_least_free_share():
    """binpack: the fullest node that still fits wins."""
    placement = index(
        record("a", BIG, {"vcpus": 12, "memory_mb": 0, "disk_gb": 0}),
        record("b", SMALL),
        record("c", BIG, {"vcpus": 0, "memory_mb": 0, "disk_gb": 900}),
    )
    assert placement.place(req(strategy="binpack"), 100.0) == "c"


def test_ties_go_to_the_smallest_node_id():
    """Identical nodes tie; the smallest id wins, whatever order they came in."""
    placement = index(*(record(i, BIG) for i in ("n3", "n1", "n2")))
    assert placement.place(req(), 100.0) == "n1"
    assert placement.place(req(strategy="binpack"), 100.0) == "n1"
    placement.remove("n1")
    assert placement.place(req(), 100.0) == "n2"


def test_many_ties_and_a_join_go_to_the_smallest_node_id():
    """Past FEW_TIES tied nodes too, before and after a join, the smallest id wins."""
    ids = [f"n{k:04d}" for k in range(FEW_TIES + 50)]
    placement = index(*(record(i, BIG) for i in reversed(ids)))
    assert placement.place(req(), 100.0) == "n0000"
    placement.update(record("m", BIG))  # a join: the order is stale again
    assert placement.place(req(), 100.0) == "m"
    placement.update(record("a", BIG, labels={"zone": "z"}))
    placement.update(record("b", BIG, labels={"zone": "z"}))
    assert placement.place(req(where={"zone": "z"}), 100.0) == "a"  # few ties


def test_where_and_avoid_filter():
    """Only nodes with every where label are chosen; avoided ones never."""
    placement = index(
        record("a", BIG, labels={"zone": "x", "gpu": "yes"}),
        record("b", BIG, labels={"zone": "x"}),
        record("c", BIG, labels={"zone": "y", "gpu": "yes"}),
    )
    assert placement.place(req(where={"zone": "x", "gpu": "yes"}), 100.0) == "a"
    assert placement.place(req(where={"gpu": "yes"}, avoid=["a"]), 100.0) == "c"
    assert placement.place(req(where={"zone": "x"}, avoid=["a"]), 100.0) == "b"


def test_labels_change_with_the_heartbeat():
    """A node's labels are those of its last heartbeat that changed them."""
    node = record("a", BIG, labels={"zone": "x"})
    placement = index(node, record("b", BIG, labels={"zone": "x"}))
    assert placement.place(req(where={"zone": "x"}), 100.0) == "a"
    node.labels = {"zone": "y"}
    placement.update(node, ("labels",))
    with pytest.raises(NoFit):
        placement.place(req(where={"zone": "x"}, avoid=["b"]), 100.0)
    assert placement.place(req(where={"zone": "x"}), 100.0) == "b"
    assert placement.place(req(where={"zone": "y"}), 100.0) == "a"


def test_offline_nodes_are_never_chosen():
    """A silent node, one that left and one loaded at start-up are offline."""
    placement = index(
        record("a", BIG, seen=50.0),
        record("b", BIG, left=True),
    )
    placement.update(record("c", BIG), gone=True)
    with pytest.raises(NoFit) as caught:
        placement.place(req(), 100.0)
    assert caught.value.counts["offline"] == 3


def test_no_fit_counts_each_node_once_under_its_first_reason():
    """-32006's counts: offline, labels, vcpus, memory_mb, disk_gb in that order; avoided
    nodes not counted."""
    full_cpu = {"vcpus": 16, "memory_mb": 32768, "disk_gb": 1000}
    placement = index(
        record("off", BIG, seen=1.0, labels={"zone": "x"}),
        record("nolabel", BIG),
        record("cpu", BIG, full_cpu, labels={"zone": "x"}),
        record(
            "mem", BIG, {"vcpus": 0, "memory_mb": 32768, "disk_gb": 1000}, {"zone": "x"}
        ),
        record("disk", BIG, {"vcpus": 0, "memory_mb": 0, "disk_gb": 999}, {"zone": "x"}),
        record("avoided", BIG, labels={"zone": "x"}),
    )
    with pytest.raises(NoFit) as caught:
        placement.place(req(where={"zone": "x"}, avoid=["avoided"]), 100.0)
    assert caught.value.counts == {
        "offline": 1,
        "labels": 1,
        "vcpus": 1,
        "memory_mb": 1,
        "disk_gb": 1,
    }


def test_reservations_hold_until_reflected_released_or_expired():
    """A reservation takes room until a heartbeat shows the VM after it was created, it
    is released, or its hold passes."""
    node = record("a", SMALL)
    placement = index(node)
    big = req(vcpus=3)
    held = placement.reserve("a", big.amounts, 100.0)
    with pytest.raises(NoFit) as caught:
        placement.place(big, 100.0)
    assert caught.value.counts["vcpus"] == 1
    # A heartbeat before the create finished changes nothing.
    node.usage = {"vcpus": 3, "memory_mb": 1024, "disk_gb": 10}
    placement.update(node, ("usage",))
    assert placement.reserved("a")["vcpus"] == 3
    placement.created(held)
    placement.update(node, ("usage",))
    assert placement.reserved("a")["vcpus"] == 0
    # Released on failure, and lapsing after its hold.
    node.usage = dict(IDLE)
    placement.update(node, ("usage",))
    other = placement.reserve("a", big.amounts, 100.0)
    placement.release(other)
    assert placement.place(big, 100.0) == "a"
    placement.reserve("a", big.amounts, 100.0)
    with pytest.raises(NoFit):
        placement.place(big, 110.0)
    assert placement.place(big, 120.5) == "a"


def test_a_node_without_capacity_fits_nothing():
    """A node that reported no capacity is set aside for the first resource."""
    placement = index(record("a", {}))
    with pytest.raises(NoFit) as caught:
        placement.place(req(), 100.0)
    assert caught.value.counts["vcpus"] == 1


def test_rows_are_reused_and_grow():
    """Thousands of nodes come and go; placement still sees exactly the live ones."""
    placement = index(*(record(f"n{i:05d}", BIG) for i in range(3000)))
    for i in range(0, 3000, 2):
        placement.remove(f"n{i:05d}")
    assert len(placement) == 1500
    assert placement.place(req(), 100.0) == "n00001"
    placement.update(record("a-new", BIG))
    assert placement.place(req(), 100.0) == "a-new"
