"""
The explorer's methods and proxy, with a real explorer and real nodes in this process,
over real Unix and TCP sockets.
"""

import os

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from hero_compute.explorer.service import ExplorerService
from hero_compute.node.service import NodeService
from hero_compute.node.vms import MemoryVmManager
from hero_compute.rpc.addresses import parse_address, parse_listen
from hero_compute.rpc.http_client import RpcClient
from hero_compute.rpc.errors import (
    InvalidParams,
    NodeNotFound,
    NodeOffline,
    NodeUnreachable,
    RefusedByPolicy,
    VmNotFound,
)
from hero_compute.rpc.listeners import unix_endpoint_string


@pytest.fixture
def sockets(tmp_path):
    """A short socket directory (Unix socket paths are limited to 108 bytes)."""
    import tempfile

    path = tempfile.mkdtemp(prefix="hc-", dir="/tmp")
    yield path
    # Every service using it has stopped by now: none may leave its socket behind.
    assert not [n for n in os.listdir(path) if n.endswith((".sock", ".lock"))]
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


@pytest_twisted.async_yield_fixture
async def explorer(sockets):
    """An explorer on a Unix socket and 127.0.0.1:0, offline after 1 s."""
    svc = ExplorerService(
        reactor,
        [unix_endpoint_string(f"{sockets}/explorer.sock"),
         parse_listen("127.0.0.1:0").endpoint_string()],
        offline_after=1.0,
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


async def sleep(seconds):
    """Let the real reactor run for a while."""
    await task.deferLater(reactor, seconds, lambda: None)


def start_node(sockets, explorers, name="n1", tcp=None, interval=0.2):
    """A node in this process with an in-memory VM manager."""
    node = NodeService(
        reactor,
        socket_path=f"{sockets}/{name}.sock",
        tcp=parse_listen(tcp) if tcp else None,
        listen=[],
        explorers=[parse_address(e) for e in explorers],
        vms=MemoryVmManager(reactor),
        state_dir=f"{sockets}/{name}-state",
        node_id=name,
        name=name,
        interval=interval,
    )
    node.privilegedStartService()
    node.startService()
    return node


async def wait_online(client, uri, node_id, timeout=5.0):
    """Wait until the explorer lists the node as online."""
    for _ in range(int(timeout / 0.05)):
        try:
            info = await client.call(uri, "explorer.get_node", {"node_id": node_id})
            if info["status"] == "online":
                return info
        except NodeNotFound:
            pass
        await sleep(0.05)
    raise AssertionError(f"{node_id} never came online")


@pytest_twisted.ensureDeferred
async def test_unix_node_registers_and_is_proxied(explorer, client, sockets):
    """A local node heartbeats over Unix with its unix:// URI and is reachable via call."""
    unix, _ = uris(explorer)
    node = start_node(sockets, [unix])
    try:
        info = await wait_online(client, unix, "n1")
        assert info["socket_path"] == f"unix://{sockets}/n1.sock"
        assert info["transport"] == "unix"
        result = await client.call(unix, "explorer.call",
                                   {"node_id": "n1", "method": "node.info"})
        assert result["node_id"] == "n1"
        assert result["explorers"][0]["state"] == "ok"
        created = await client.call(unix, "explorer.call", {
            "node_id": "n1", "method": "vm.create",
            "params": {"name": "a", "vcpus": 1, "memory_mb": 128, "disk_gb": 1}})
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
    node = start_node(sockets, [unix])
    await wait_online(client, unix, "n1")
    running_at_leave = []
    call = node.client.call

    def recording(address, method, params=None, timeout=None):
        if method == "explorer.leave":
            running_at_leave.append([loop.running for loop in node.heartbeats])
        return call(address, method, params, timeout=timeout)

    node.client.call = recording
    await node.stopService()
    assert running_at_leave == [[False]]
    await task.deferLater(reactor, 0.5, lambda: None)
    info = await client.call(unix, "explorer.get_node", {"node_id": "n1"})
    assert info["status"] == "offline"


@pytest_twisted.ensureDeferred
async def test_tcp_node_registers_with_tcp_address(explorer, client, sockets):
    """A node reaching the explorer over TCP reports its tcp:// address and is proxied over TCP."""
    _, tcp = uris(explorer)
    node = start_node(sockets, [tcp], tcp="127.0.0.1:0")
    try:
        info = await wait_online(client, tcp, "n1")
        assert info["transport"] == "tcp"
        assert info["socket_path"] == f"tcp://127.0.0.1:{node.tcp_port()}"
        result = await client.call(tcp, "explorer.call",
                                   {"node_id": "n1", "method": "vm.list"})
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
        info = await wait_online(client, tcp, "n1")
        assert info["socket_path"] == f"tcp://127.0.0.1:{node.tcp_port()}"
    finally:
        await node.stopService()


@pytest_twisted.ensureDeferred
async def test_tcp_heartbeat_claiming_unix_is_refused(explorer, client):
    """A heartbeat over TCP that claims a unix:// address gets -32010 and is not recorded."""
    unix, tcp = uris(explorer)
    with pytest.raises(RefusedByPolicy) as e:
        await client.call(tcp, "explorer.heartbeat",
                          {"node_id": "evil", "socket_path": "unix:///run/docker.sock"})
    assert e.value.code == -32010
    assert await client.call(unix, "explorer.list_nodes") == []


@pytest_twisted.ensureDeferred
async def test_bad_socket_path_is_invalid_params(explorer, client):
    """A heartbeat with an unparsable address gets -32602 naming it and the accepted forms."""
    unix, _ = uris(explorer)
    with pytest.raises(InvalidParams) as e:
        await client.call(unix, "explorer.heartbeat",
                          {"node_id": "n", "socket_path": "http://x:1"})
    assert "http://x:1" in e.value.message and "tcp://host:port" in e.value.message


@pytest_twisted.ensureDeferred
async def test_call_errors(explorer, client, sockets):
    """call: -32001 unknown node, -32010 non-node method, node errors unchanged, -32002 offline."""
    unix, _ = uris(explorer)
    with pytest.raises(NodeNotFound):
        await client.call(unix, "explorer.call", {"node_id": "x", "method": "node.info"})
    node = start_node(sockets, [unix])
    try:
        await wait_online(client, unix, "n1")
        with pytest.raises(RefusedByPolicy):
            await client.call(unix, "explorer.call",
                              {"node_id": "n1", "method": "explorer.remove_node",
                               "params": {"node_id": "n1"}})
        with pytest.raises(VmNotFound) as e:
            await client.call(unix, "explorer.call",
                              {"node_id": "n1", "method": "vm.get",
                               "params": {"vm_id": "nope"}})
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
    await client.call(unix, "explorer.heartbeat",
                      {"node_id": "ghost", "socket_path": f"unix://{sockets}/ghost.sock"})
    with pytest.raises(NodeUnreachable) as e:
        await client.call(unix, "explorer.call", {"node_id": "ghost", "method": "node.info"})
    assert e.value.code == -32003


@pytest_twisted.ensureDeferred
async def test_list_filter_info_and_remove(explorer, client):
    """list_nodes filters by status; info counts nodes and lists listeners; remove forgets."""
    unix, tcp = uris(explorer)
    for n in ("a", "b"):
        await client.call(unix, "explorer.heartbeat",
                          {"node_id": n, "socket_path": f"/tmp/{n}.sock", "vm_count": 2,
                           "capacity": {"vcpus": 4, "memory_mb": 1024, "disk_gb": 10}})
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
    await sleep(1.1)
    offline = await client.call(unix, "explorer.list_nodes", {"status": "offline"})
    assert [n["node_id"] for n in offline] == ["b"]


@pytest_twisted.ensureDeferred
async def test_two_explorers_one_down(explorer, client, sockets):
    """A node with a dead explorer keeps heartbeating the live one on schedule."""
    unix, _ = uris(explorer)
    node = start_node(sockets, [f"unix://{sockets}/dead.sock", unix], interval=0.2)
    try:
        await wait_online(client, unix, "n1")
        seen = []
        for _ in range(10):
            info = await client.call(unix, "explorer.get_node", {"node_id": "n1"})
            seen.append(info["last_seen"])
            await sleep(0.2)
        gaps = sorted({b - a for a, b in zip(seen, seen[1:]) if b != a})
        assert len(set(seen)) >= 7
        assert max(gaps) < 0.5
        info = await client.call(unix, "explorer.call", {"node_id": "n1", "method": "node.info"})
        states = {e["address"]: e["state"] for e in info["explorers"]}
        assert states == {f"unix://{sockets}/dead.sock": "failing", unix: "ok"}
    finally:
        await node.stopService()
