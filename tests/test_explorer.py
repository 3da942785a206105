"""
The explorer's methods and proxy, with a real explorer and real nodes in this process,
over real Unix and TCP sockets.
"""

import os

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from hero_compute.explorer.tree import make_explorer
from hero_compute.node.heartbeat import backoff_delay
from hero_compute.node.service import make_node
from hero_compute.rpc.addresses import parse_address, parse_listen
from hero_compute.rpc.errors import (
    CallTimedOut,
    InvalidParams,
    NodeNotFound,
    NodeOffline,
    NodeUnreachable,
    RefusedByPolicy,
    VmNotFound,
)
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.listen import Listen

from .fakes import MemoryVmManager

#: A realistic Unix time for the explorer's clock.
EPOCH = 1_700_000_000


@pytest.fixture
def sockets(short_tmp):
    """The socket directory; every service using it has stopped by the end of the test,
    and none may leave its socket behind."""
    yield short_tmp
    assert not [n for n in os.listdir(short_tmp) if n.endswith((".sock", ".lock"))]


@pytest.fixture
def clock():
    """The explorer's clock: liveness moves only when the test says so."""
    c = Clock()
    c.advance(EPOCH)
    return c


@pytest_twisted.async_yield_fixture
async def explorer(sockets, clock):
    """An explorer on a Unix socket and 127.0.0.1:0, offline after 1 s of its clock."""
    svc = make_explorer(
        reactor=reactor,
        clock=clock,
        listen=[
            Listen.unix(f"{sockets}/explorer.sock"),
            Listen.tcp(parse_listen("127.0.0.1:0")),
        ],
        offline_after=1.0,
        state_dir=f"{sockets}/state",
        call_timeout=2.0,
        connect_timeout=1.0,
    )
    svc.privilegedStartService()
    svc.startService()
    yield svc
    await svc.stopService()


@pytest_twisted.async_yield_fixture
async def client():
    """Our client, closed at the end."""
    c = RpcClient(reactor, timeout=5)
    yield c
    await c.close()


def uris(svc):
    """The explorer's bound (unix, tcp) URIs."""
    unix = next(u for u in svc.listeners.bound if u.startswith("unix://"))
    tcp = next(u for u in svc.listeners.bound if u.startswith("tcp://"))
    return unix, tcp


def start_node(sockets, explorers, name="n1", tcp=None, interval=0.2, clock=None):
    """A node in this process with an in-memory VM manager; its heartbeats are scheduled
    on its own clock (a new one unless given), so they go out only when a test says."""
    node = make_node(
        reactor=reactor,
        clock=clock or Clock(),
        socket_path=f"{sockets}/{name}.sock",
        tcp=parse_listen(tcp) if tcp else None,
        listen=[],
        explorers=[parse_address(e) for e in explorers],
        vms=MemoryVmManager(reactor),
        state_dir=f"{sockets}/{name}-state",
        interval=interval,
        node_id=name,
        name=name,
    )
    node.privilegedStartService()
    node.startService()
    return node


async def heartbeat(node):
    """Send one heartbeat to each of the node's explorers now, and wait for the answers."""
    await defer.gatherResults([loop.beat() for loop in node.heartbeats])


@pytest_twisted.ensureDeferred
async def test_unix_node_registers_and_is_proxied(explorer, client, sockets):
    """A local node heartbeats over Unix with its unix:// URI and is reachable via call."""
    unix, _ = uris(explorer)
    node = start_node(sockets, [unix])
    try:
        await heartbeat(node)
        info = await client.call(unix, "explorer.get_node", {"node_id": "n1"})
        assert info["status"] == "online"
        assert info["socket_path"] == f"unix://{sockets}/n1.sock"
        assert info["transport"] == "unix"
        result = await client.call(
            unix, "explorer.call", {"node_id": "n1", "method": "node.info"}
        )
        assert result["node_id"] == "n1"
        assert result["explorers"][0]["state"] == "ok"
        created = await client.call(
            unix,
            "explorer.call",
            {
                "node_id": "n1",
                "method": "vm.create",
                "params": {"name": "a", "vcpus": 1, "memory_mb": 128, "disk_gb": 1},
            },
        )
        assert created["state"] == "stopped"
    finally:
        await node.stopService()
    # The node said goodbye: offline at once, well before offline_after.
    info = await client.call(unix, "explorer.get_node", {"node_id": "n1"})
    assert info["status"] == "offline"


@pytest_twisted.ensureDeferred
async def test_heartbeats_stop_before_the_goodbye(explorer, client, sockets):
    """On stop, a node's heartbeat loops are stopped before it sends explorer.leave, so
    no heartbeat can land after the goodbye and bring it back online."""
    unix, _ = uris(explorer)
    node_clock = Clock()
    node = start_node(sockets, [unix], clock=node_clock)
    await heartbeat(node)
    running_at_leave = []
    call = node.client.call

    def recording(address, method, params=None, timeout=None):
        if method == "explorer.leave":
            running_at_leave.append([loop.running for loop in node.heartbeats])
        return call(address, method, params, timeout=timeout)

    node.client.call = recording
    await node.stopService()
    assert running_at_leave == [[False]]
    assert not node_clock.getDelayedCalls()
    info = await client.call(unix, "explorer.get_node", {"node_id": "n1"})
    assert info["status"] == "offline"


@pytest_twisted.ensureDeferred
async def test_goodbye_after_a_failed_heartbeat(explorer, client, sockets):
    """A node whose last heartbeat failed (a slow answer, say) still says goodbye to an
    explorer that accepted it before: offline at once, not after offline_after."""
    unix, _ = uris(explorer)
    node = start_node(sockets, [unix], clock=Clock())
    await heartbeat(node)
    call = node.client.call

    def slow_heartbeat(address, method, params=None, timeout=None):
        if method == "explorer.heartbeat":
            return defer.fail(CallTimedOut(address, "no response within 0.3 s"))
        return call(address, method, params, timeout=timeout)

    node.client.call = slow_heartbeat
    await heartbeat(node)
    assert node.heartbeats[0].state.state == "failing"
    await node.stopService()
    info = await client.call(unix, "explorer.get_node", {"node_id": "n1"})
    assert info["status"] == "offline"


@pytest_twisted.ensureDeferred
async def test_tcp_node_registers_with_tcp_address(explorer, client, sockets):
    """A node reaching the explorer over TCP reports its tcp:// address and is proxied over
    TCP."""
    _, tcp = uris(explorer)
    node = start_node(sockets, [tcp], tcp="127.0.0.1:0")
    try:
        await heartbeat(node)
        info = await client.call(tcp, "explorer.get_node", {"node_id": "n1"})
        assert info["status"] == "online" and info["transport"] == "tcp"
        assert info["socket_path"] == f"tcp://127.0.0.1:{node.advertiser.tcp_port()}"
        result = await client.call(
            tcp, "explorer.call", {"node_id": "n1", "method": "vm.list"}
        )
        assert result == []
    finally:
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_explorer_named_by_host_name(explorer, client, sockets):
    """A node given its explorer by name reports the address of its own end of the
    connection to it."""
    _, tcp = uris(explorer)
    port = parse_address(tcp).port
    node = start_node(sockets, [f"tcp://localhost:{port}"], tcp="127.0.0.1:0")
    try:
        await heartbeat(node)
        info = await client.call(tcp, "explorer.get_node", {"node_id": "n1"})
        assert info["socket_path"] == f"tcp://127.0.0.1:{node.advertiser.tcp_port()}"
    finally:
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_tcp_heartbeat_claiming_unix_is_refused(explorer, client):
    """A heartbeat over TCP that claims a unix:// address gets -32010 and is not
    recorded."""
    unix, tcp = uris(explorer)
    with pytest.raises(RefusedByPolicy) as e:
        await client.call(
            tcp,
            "explorer.heartbeat",
            {"node_id": "evil", "socket_path": "unix:///run/docker.sock"},
        )
    assert e.value.code == -32010
    assert await client.call(unix, "explorer.list_nodes") == []


@pytest_twisted.ensureDeferred
async def test_bad_socket_path_is_invalid_params(explorer, client):
    """A heartbeat with an unparsable address gets -32602 naming it and the accepted
    forms."""
    unix, _ = uris(explorer)
    with pytest.raises(InvalidParams) as e:
        await client.call(
            unix, "explorer.heartbeat", {"node_id": "n", "socket_path": "http://x:1"}
        )
    assert "http://x:1" in e.value.message and "tcp://host:port" in e.value.message


@pytest_twisted.ensureDeferred
async def test_call_errors(explorer, client, sockets):
    """call: -32001 unknown node, -32010 non-node method, node errors unchanged, -32002
    offline."""
    unix, _ = uris(explorer)
    with pytest.raises(NodeNotFound):
        await client.call(unix, "explorer.call", {"node_id": "x", "method": "node.info"})
    node = start_node(sockets, [unix])
    try:
        await heartbeat(node)
        with pytest.raises(RefusedByPolicy):
            await client.call(
                unix,
                "explorer.call",
                {
                    "node_id": "n1",
                    "method": "explorer.remove_node",
                    "params": {"node_id": "n1"},
                },
            )
        with pytest.raises(VmNotFound) as e:
            await client.call(
                unix,
                "explorer.call",
                {"node_id": "n1", "method": "vm.get", "params": {"vm_id": "nope"}},
            )
        assert e.value.code == -32004 and "nope" in e.value.message
    finally:
        await node.stopService()
    with pytest.raises(NodeOffline) as e:
        await client.call(unix, "explorer.call", {"node_id": "n1", "method": "node.info"})
    assert e.value.code == -32002


@pytest_twisted.ensureDeferred
async def test_unreachable_node_fails_fast(explorer, client, sockets):
    """A node online by heartbeat but whose socket is gone gets -32003, not a hang."""
    unix, _ = uris(explorer)
    await client.call(
        unix,
        "explorer.heartbeat",
        {"node_id": "ghost", "socket_path": f"unix://{sockets}/ghost.sock"},
    )
    with pytest.raises(NodeUnreachable) as e:
        await client.call(
            unix, "explorer.call", {"node_id": "ghost", "method": "node.info"}
        )
    assert e.value.code == -32003


@pytest_twisted.ensureDeferred
async def test_list_filter_info_and_remove(explorer, client, clock):
    """list_nodes filters by status; info counts nodes and lists listeners; remove
    forgets."""
    unix, tcp = uris(explorer)
    for n in ("a", "b"):
        await client.call(
            unix,
            "explorer.heartbeat",
            {
                "node_id": n,
                "socket_path": f"/tmp/{n}.sock",
                "vm_count": 2,
                "capacity": {"vcpus": 4, "memory_mb": 1024, "disk_gb": 10},
            },
        )
    await client.call(unix, "explorer.leave", {"node_id": "b"})
    online = await client.call(unix, "explorer.list_nodes", {"status": "online"})
    assert [n["node_id"] for n in online] == ["a"]
    assert online[0]["socket_path"] == "unix:///tmp/a.sock"
    assert online[0]["vm_count"] == 2 and online[0]["capacity"]["vcpus"] == 4
    info = await client.call(tcp, "explorer.info")
    assert info["nodes"] == {"online": 1, "offline": 1}
    assert set(info["listeners"]) == {unix, tcp}
    assert await client.call(unix, "explorer.remove_node", {"node_id": "a"}) is True
    with pytest.raises(NodeNotFound):
        await client.call(unix, "explorer.get_node", {"node_id": "a"})
    clock.advance(1.1)
    offline = await client.call(unix, "explorer.list_nodes", {"status": "offline"})
    assert [n["node_id"] for n in offline] == ["b"]


@pytest_twisted.ensureDeferred
async def test_two_explorers_one_down(explorer, client, sockets, clock):
    """A node with a dead explorer keeps heartbeating the live one: every round reaches
    it, its next heartbeat is due an interval later while the dead one backs off, and
    node.info shows one failing, one ok."""
    unix, _ = uris(explorer)
    dead = f"unix://{sockets}/dead.sock"
    node_clock = Clock()
    node = start_node(sockets, [dead, unix], interval=0.2, clock=node_clock)
    try:
        seen = []
        for _ in range(3):
            await heartbeat(node)
            info = await client.call(unix, "explorer.get_node", {"node_id": "n1"})
            seen.append(info["last_seen"])
            clock.advance(0.2)
        assert seen == [EPOCH, EPOCH + 0.2, EPOCH + 0.4]
        live, backing_off = sorted(c.getTime() for c in node_clock.getDelayedCalls())
        assert live == 0.2
        assert (
            backoff_delay(0.2, 3, lambda: 0.0)
            <= backing_off
            <= backoff_delay(0.2, 3, lambda: 1.0)
        )
        info = await client.call(
            unix, "explorer.call", {"node_id": "n1", "method": "node.info"}
        )
        states = {e["address"]: e["state"] for e in info["explorers"]}
        assert states == {dead: "failing", unix: "ok"}
    finally:
        await node.stopService()


# -- delta heartbeats (issue #12): the explorer keeps what a node leaves out


def full_beat(node_id="d1", **fields):
    """A full heartbeat's params."""
    return {
        "node_id": node_id,
        "socket_path": f"/tmp/{node_id}.sock",
        "name": f"name-{node_id}",
        "version": "9",
        "capacity": {"vcpus": 8, "memory_mb": 4096, "disk_gb": 50},
        "usage": {"vcpus": 1, "memory_mb": 512, "disk_gb": 5},
        "vm_count": 1,
        "labels": {"zone": "a"},
        **fields,
    }


@pytest_twisted.ensureDeferred
async def test_delta_heartbeat_keeps_what_it_leaves_out(explorer, client, clock):
    """A heartbeat naming the explorer's session changes only the fields it carries;
    last_seen moves."""
    unix, _ = uris(explorer)
    ack = await client.call(unix, "explorer.heartbeat", full_beat())
    session = ack["session"]
    assert isinstance(session, str) and ack["accepted"] is True
    before = await client.call(unix, "explorer.get_node", {"node_id": "d1"})
    clock.advance(0.5)
    again = await client.call(
        unix,
        "explorer.heartbeat",
        {
            "node_id": "d1",
            "socket_path": "/tmp/d1.sock",
            "session": session,
            "usage": {"vcpus": 3, "memory_mb": 512, "disk_gb": 5},
        },
    )
    assert again["session"] == session
    after = await client.call(unix, "explorer.get_node", {"node_id": "d1"})
    assert after["last_seen"] == before["last_seen"] + 0.5
    assert after["usage"]["vcpus"] == 3
    for field in ("name", "version", "capacity", "vm_count", "labels", "first_seen"):
        assert after[field] == before[field], field


@pytest_twisted.ensureDeferred
async def test_stale_session_is_refused_and_records_nothing(explorer, client, clock):
    """A delta with another session, for an unknown node, or for a node that left is
    -32602 with data {"resend": "full"}; nothing is recorded, nobody is admitted."""
    unix, _ = uris(explorer)
    session = (await client.call(unix, "explorer.heartbeat", full_beat()))["session"]
    before = await client.call(unix, "explorer.get_node", {"node_id": "d1"})
    clock.advance(0.5)
    attempts = [
        {"node_id": "d1", "socket_path": "/tmp/d1.sock", "session": "another"},
        {"node_id": "new", "socket_path": "/tmp/new.sock", "session": session},
    ]
    for params in attempts:
        with pytest.raises(InvalidParams) as e:
            await client.call(unix, "explorer.heartbeat", params)
        assert e.value.data == {"resend": "full"}
    assert await client.call(unix, "explorer.get_node", {"node_id": "d1"}) == before
    with pytest.raises(NodeNotFound):
        await client.call(unix, "explorer.get_node", {"node_id": "new"})
    await client.call(unix, "explorer.leave", {"node_id": "d1"})
    with pytest.raises(InvalidParams):
        await client.call(
            unix,
            "explorer.heartbeat",
            {"node_id": "d1", "socket_path": "/tmp/d1.sock", "session": session},
        )
    assert (await client.call(unix, "explorer.get_node", {"node_id": "d1"}))[
        "status"
    ] == "offline"
    # A full heartbeat is always accepted, as from a node that knows no sessions.
    idle = {"vcpus": 0, "memory_mb": 0, "disk_gb": 0}
    await client.call(unix, "explorer.heartbeat", full_beat(usage=idle))
    back = await client.call(unix, "explorer.get_node", {"node_id": "d1"})
    assert back["status"] == "online" and back["usage"] == idle


@pytest_twisted.ensureDeferred
async def test_node_sends_deltas_and_a_restarted_explorer_gets_it_whole(
    sockets, clock, client
):
    """A real node's steady heartbeats are deltas; an explorer restarted on the same
    socket and state refuses the first one and gets the full record in the same tick."""

    def explorer():
        svc = make_explorer(
            reactor=reactor,
            clock=clock,
            listen=[Listen.unix(f"{sockets}/explorer.sock")],
            offline_after=1.0,
            state_dir=f"{sockets}/state",
        )
        svc.privilegedStartService()
        svc.startService()
        return svc

    first = explorer()
    unix = f"unix://{sockets}/explorer.sock"
    node = start_node(sockets, [unix])
    try:
        (loop,) = node.heartbeats
        await heartbeat(node)
        await heartbeat(node)
        first_session = loop._session
        assert first_session is not None
        whole = await client.call(unix, "explorer.get_node", {"node_id": "n1"})
        await first.stopService()
        # A restart ends the old process and its connections; in this one process,
        # the node's pooled connection would go on reaching the stopped explorer.
        await node.client.close()
        second = explorer()
        try:
            await heartbeat(node)
            assert loop.state.state == "ok"
            assert loop._session not in (None, first_session)
            again = await client.call(unix, "explorer.get_node", {"node_id": "n1"})
            assert again["status"] == "online"
            for field in ("name", "version", "capacity", "usage", "vm_count"):
                assert again[field] == whole[field], field
        finally:
            await node.stopService()
            await second.stopService()
    finally:
        if first.running:
            await first.stopService()


@pytest_twisted.ensureDeferred
async def test_delta_cannot_speak_for_a_node_without_its_secret(explorer, client, clock):
    """The attacker holds the explorer's session (any node gets it) and sends deltas
    for a node bound to its secret, with another secret and with none: refused
    (-32010), and the node's record is exactly as before."""
    unix, tcp = uris(explorer)
    secret = "ab" * 32
    session = (
        await client.call(
            tcp,
            "explorer.heartbeat",
            full_beat("v1", socket_path="tcp://127.0.0.1:9", secret=secret),
        )
    )["session"]
    before = await client.call(unix, "explorer.get_node", {"node_id": "v1"})
    clock.advance(0.5)
    for stolen in ({"secret": "cd" * 32}, {}):
        with pytest.raises(RefusedByPolicy):
            await client.call(
                tcp,
                "explorer.heartbeat",
                {
                    "node_id": "v1",
                    "socket_path": "tcp://127.0.0.1:9",
                    "session": session,
                    "usage": {"vcpus": 99, "memory_mb": 0, "disk_gb": 0},
                    "labels": {"zone": "evil"},
                    **stolen,
                },
            )
    assert await client.call(unix, "explorer.get_node", {"node_id": "v1"}) == before
