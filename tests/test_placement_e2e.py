"""
Placement with real processes (CONTRACT §9): an explorer and ``twistd node`` s with
their own labels and capacity caps, and fake nodes (tiny real JSON-RPC servers on Unix
sockets) that refuse every ``vm.create``.  VMs are only defined (``vm.create`` makes a
sparse disk), never started: no guest is needed.
"""

import http.server
import json
import os
import socket
import socketserver
import threading

import pytest

from .support import result, rpc, wait_for

SMALL_VM = {"vcpus": 1, "memory_mb": 512, "disk_gb": 5}

#: node id -> (NODE_LABELS, NODE_CAPACITY)
NODES = {
    "node-a": ("zone=a,tier=web", "vcpus=8,memory=16G,disk=100G"),
    "node-b": ("zone=a,tier=db", "vcpus=4,memory=4G,disk=40G"),
    "node-c": ("zone=b", "vcpus=2,memory=2G,disk=20G"),
}


def start_explorer(twistd, tmp, offline_after="3"):
    """An explorer on ``tmp/e.sock``; returns its URI."""
    explorer = twistd(
        ["explorer", "--socket", f"{tmp}/e.sock", "--offline-after", offline_after]
    )
    explorer.listening()
    return f"unix://{tmp}/e.sock"


def start_node(twistd, tmp, node_id, labels, capacity, env=None):
    """A node heartbeating the explorer of ``tmp`` every 0.3 s, with ``env`` added to its
    environment; returns the process."""
    node = twistd(
        [
            "node",
            "--socket",
            f"{tmp}/{node_id}.sock",
            "--state-dir",
            f"{tmp}/{node_id}",
            "--explorer",
            f"unix://{tmp}/e.sock",
            "--interval",
            "0.3",
            "--node-id",
            node_id,
        ],
        env={"NODE_LABELS": labels, "NODE_CAPACITY": capacity, **(env or {})},
    )
    node.listening()
    return node


def online(explorer, count):
    """Wait until ``count`` nodes are online."""
    return wait_for(
        lambda: len(result(explorer, "explorer.list_nodes", {"status": "online"})) == count,
        what=f"{count} nodes online",
    )


def place(explorer, **params):
    """The node id explorer.place chooses."""
    return result(explorer, "explorer.place", {**SMALL_VM, **params})["node_id"]


def no_fit(explorer, **params):
    """explorer.place's -32006 error data."""
    error = rpc(explorer, "explorer.place", {**SMALL_VM, **params})["error"]
    assert error["code"] == -32006 and error["message"] == "no node fits", error
    return error["data"]


@pytest.fixture
def fleet(twistd, short_tmp):
    """An explorer and the three nodes of :data:`NODES`, online."""
    explorer = start_explorer(twistd, short_tmp)
    nodes = {
        node_id: start_node(twistd, short_tmp, node_id, labels, capacity)
        for node_id, (labels, capacity) in NODES.items()
    }
    online(explorer, 3)
    return explorer, nodes


def test_nodes_report_labels_and_capped_capacity(fleet, short_tmp):
    """node.info and the explorer's NodeInfo carry NODE_LABELS and NODE_CAPACITY."""
    explorer, _ = fleet
    info = result(f"unix://{short_tmp}/node-b.sock", "node.info")
    assert info["labels"] == {"zone": "a", "tier": "db"}
    assert info["capacity"] == {"vcpus": 4, "memory_mb": 4096, "disk_gb": 40}
    record = result(explorer, "explorer.get_node", {"node_id": "node-b"})
    assert record["labels"] == info["labels"] and record["capacity"] == info["capacity"]


def test_spread_binpack_where_avoid_and_offline(fleet):
    """spread takes the emptiest node, binpack the fullest, where and avoid filter, and
    a node that left is never chosen."""
    explorer, nodes = fleet
    # Free share of the scarcest resource after placing: a 7/8, b 3/4, c 1/2.
    assert place(explorer) == "node-a"
    assert place(explorer, strategy="spread") == "node-a"
    assert place(explorer, strategy="binpack") == "node-c"
    assert place(explorer, where={"zone": "a"}, strategy="binpack") == "node-b"
    assert place(explorer, where={"tier": "db"}) == "node-b"
    assert place(explorer, avoid=["node-a"]) == "node-b"
    assert result(explorer, "explorer.place", SMALL_VM)["name"]
    nodes["node-a"].stop()
    wait_for(
        lambda: (
            result(explorer, "explorer.get_node", {"node_id": "node-a"})["status"]
            == "offline"
        ),
        what="node-a offline",
    )
    assert place(explorer) == "node-b"
    assert no_fit(explorer, where={"tier": "web"}) == {
        "offline": 1,
        "labels": 2,
        "vcpus": 0,
        "memory_mb": 0,
        "disk_gb": 0,
    }


def test_no_fit_counts_each_node_under_its_first_reason(fleet):
    """-32006 counts the nodes set aside by their first reason; avoided ones not at all."""
    explorer, nodes = fleet
    # b lacks memory, c CPUs; a is avoided.
    assert no_fit(explorer, vcpus=4, memory_mb=8192, disk_gb=10, avoid=["node-a"]) == {
        "offline": 0,
        "labels": 0,
        "vcpus": 1,
        "memory_mb": 1,
        "disk_gb": 0,
    }
    assert no_fit(explorer, disk_gb=200) == {
        "offline": 0,
        "labels": 0,
        "vcpus": 0,
        "memory_mb": 0,
        "disk_gb": 3,
    }
    nodes["node-a"].stop()
    # Its goodbye marks it offline at once; should the goodbye itself time out on a
    # loaded machine, NODE_OFFLINE_AFTER does it.  What is counted is the point, not
    # how soon.
    wait_for(
        lambda: (
            result(explorer, "explorer.get_node", {"node_id": "node-a"})["status"]
            == "offline"
        ),
        what="node-a offline",
    )
    assert no_fit(explorer, vcpus=5, where={"zone": "a"}) == {
        "offline": 1,
        "labels": 1,
        "vcpus": 1,
        "memory_mb": 0,
        "disk_gb": 0,
    }


def test_create_vm_places_and_returns_the_node(fleet, short_tmp):
    """create_vm defines the VM on the chosen node and says which; a bad param is -32602
    with nothing created."""
    explorer, _ = fleet
    vm = result(
        explorer,
        "explorer.create_vm",
        {"name": "web1", **SMALL_VM, "where": {"zone": "a"}, "strategy": "binpack"},
    )
    assert vm["node_id"] == "node-b" and vm["name"] == "web1" and vm["state"] == "stopped"
    listed = result(f"unix://{short_tmp}/node-b.sock", "vm.list")
    assert [v["vm_id"] for v in listed] == [vm["vm_id"]]
    bad = rpc(explorer, "explorer.create_vm", {"name": "x", **SMALL_VM, "vcpus": 0})
    assert bad["error"]["code"] == -32602 and "vcpus" in bad["error"]["message"]
    for node_id in NODES:
        if node_id != "node-b":
            assert result(f"unix://{short_tmp}/{node_id}.sock", "vm.list") == []


def test_concurrent_create_vm_never_overcommits(twistd, short_tmp):
    """12 concurrent create_vm calls against a node with room for 4 give exactly 4 VMs,
    and the node's usage never exceeds its cap; the node itself refuses a fifth."""
    explorer = start_explorer(twistd, short_tmp, offline_after="30")
    start_node(twistd, short_tmp, "only", "", "vcpus=4,memory=4G,disk=40G")
    online(explorer, 1)
    node = f"unix://{short_tmp}/only.sock"
    vm = {"vcpus": 1, "memory_mb": 1024, "disk_gb": 10}
    answers = [None] * 12
    over = []
    done = threading.Event()

    def create(i):
        answers[i] = rpc(
            explorer, "explorer.create_vm", {"name": f"vm{i}", **vm}, timeout=60
        )

    def watch():
        while not done.is_set():
            info = result(node, "node.info")
            for key, cap in info["capacity"].items():
                if info["usage"][key] > cap:
                    over.append(info)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=create, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    done.set()
    watcher.join(10)
    made = [a["result"] for a in answers if "result" in a]
    refused = [a["error"] for a in answers if "error" in a]
    assert len(made) == 4, answers
    assert {e["code"] for e in refused} <= {-32005, -32006}, refused
    assert over == []
    assert len(result(node, "vm.list")) == 4
    info = result(node, "node.info")
    assert info["usage"] == {"vcpus": 4, "memory_mb": 4096, "disk_gb": 40}
    fifth = rpc(node, "vm.create", {"name": "direct", **vm})
    assert fifth["error"]["code"] == -32005, fifth
    assert len(result(node, "vm.list")) == 4


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every vm.create with -32005, and node.info with a stub."""

    protocol_version = "HTTP/1.1"

    def address_string(self):
        return "unix"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.calls.append(body["method"])
        if body["method"] == "vm.create":
            answer = {"error": {"code": -32005, "message": "not enough memory"}}
        else:
            answer = {"result": {}}
        data = json.dumps({"jsonrpc": "2.0", "id": body.get("id"), **answer}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeNode(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A real JSON-RPC server on a Unix socket that refuses every VM (-32005)."""

    daemon_threads = True

    def __init__(self, path):
        socketserver.UnixStreamServer.__init__(self, path, _Refusing)
        self.calls = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        """Stop serving and remove the socket."""
        self.shutdown()
        self.server_close()
        os.unlink(self.server_address)


@pytest.fixture
def fakes(short_tmp):
    """Start fake nodes on demand: ``fakes(node_id)``; all stopped at the end."""
    started = []

    def start(node_id):
        fake = FakeNode(f"{short_tmp}/{node_id}.sock")
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.close()


def register(explorer, node_id, path, vcpus):
    """Heartbeat a fake node into the explorer, with ``vcpus`` CPUs and plenty else."""
    result(
        explorer,
        "explorer.heartbeat",
        {
            "node_id": node_id,
            "socket_path": f"unix://{path}",
            "capacity": {"vcpus": vcpus, "memory_mb": 1 << 20, "disk_gb": 1 << 20},
            "usage": {"vcpus": 0, "memory_mb": 0, "disk_gb": 0},
        },
    )


def test_create_vm_moves_on_from_a_refusing_node(twistd, short_tmp, fakes):
    """A node answering -32005 is set aside and the VM goes to the next candidate."""
    explorer = start_explorer(twistd, short_tmp, offline_after="30")
    start_node(twistd, short_tmp, "real", "", "vcpus=2,memory=2G,disk=20G")
    online(explorer, 1)
    fake = fakes("fake")
    register(explorer, "fake", fake.server_address, 64)
    assert place(explorer) == "fake"
    vm = result(explorer, "explorer.create_vm", {"name": "v", **SMALL_VM})
    assert vm["node_id"] == "real"
    assert fake.calls == ["vm.create"]


def test_create_vm_stops_after_three_candidates(twistd, short_tmp, fakes):
    """With four refusing nodes, create_vm asks three in all and returns the last -32005."""
    explorer = start_explorer(twistd, short_tmp, offline_after="30")
    started = [fakes(f"fake{i}") for i in range(4)]
    for i, fake in enumerate(started):
        register(explorer, f"fake{i}", fake.server_address, 64 - i)
    error = rpc(explorer, "explorer.create_vm", {"name": "v", **SMALL_VM})["error"]
    assert error["code"] == -32005, error
    calls = [fake.calls for fake in started]
    assert calls == [["vm.create"], ["vm.create"], ["vm.create"], []]
    # Nothing stays reserved: the first candidate is chosen again.
    assert place(explorer) == "fake0"


def test_create_vm_reports_the_refusal_when_no_candidate_is_left(twistd, short_tmp):
    """When the only node refuses with -32005 (its host port in use), create_vm returns
    that refusal, not -32006 "no node fits", and nothing is created or held."""
    explorer = start_explorer(twistd, short_tmp, offline_after="30")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        start_node(
            twistd,
            short_tmp,
            "only",
            "",
            "vcpus=2,memory=2G,disk=20G",
            env={"NODE_VM_PORTS": f"{port}-{port}"},
        )
        online(explorer, 1)
        params = {"name": "v", **SMALL_VM, "ports": [{"guest": 22, "host": port}]}
        error = rpc(explorer, "explorer.create_vm", params)["error"]
    assert error["code"] == -32005, error
    assert f"port {port} is in use" in error["message"], error
    assert result(f"unix://{short_tmp}/only.sock", "vm.list") == []
    # Nothing stays reserved: the node is still chosen for the same VM.
    assert place(explorer) == "only"
