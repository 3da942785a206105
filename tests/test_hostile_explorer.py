"""
Hostile load on what a real ``twistd explorer`` keeps and does for others (issue 10,
CONTRACT §7): fanning calls out to a node that never answers, heartbeats built to poison
the registry, floods of new node ids, and node names that never resolve.  Each test
shows the bound held and that everyone else (a well-behaved node, a Unix caller) was
served meanwhile and lost nothing.
"""

import http.server
import json
import os
import re
import shutil
import socket
import threading
import time

import pytest

from .support import SERVED, Prober, open_fds, post, result, rpc, wait_for
from .test_hostile_transport import explorer

__all__ = ["explorer"]  # the fixture, shared


class SilentServer:
    """A TCP listener on 127.0.0.1 that accepts and never says a word; counts accepts."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self):
        """Stop listening, and hang up on everyone accepted (their calls then fail)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()


def heartbeat(node_id, address, **fields):
    """A heartbeat's params."""
    return {"node_id": node_id, "socket_path": address, "name": node_id, **fields}


def batch_of(method, params_list):
    """A JSON-RPC batch, ids 0..n-1."""
    return [
        {"jsonrpc": "2.0", "method": method, "params": params, "id": i}
        for i, params in enumerate(params_list)
    ]


def stable(record):
    """A node record without what moves on its own (time, status)."""
    return {
        k: v for k, v in record.items() if k not in ("last_seen", "status", "first_seen")
    }


GOOD = heartbeat(
    "good",
    "tcp://127.0.0.1:9",
    version="1.0",
    capacity={"vcpus": 8, "memory_mb": 16384, "disk_gb": 100},
    usage={"vcpus": 1, "memory_mb": 1024, "disk_gb": 10},
    labels={"zone": "a", "rack/row": "r1.2"},
)


# -- fan-out: calls to a node that never answers


def test_calls_to_a_silent_node_are_bounded(explorer):
    """
    Batches of 100 ``explorer.call`` to two nodes that accept and never answer, with
    EXPLORER_CALLS_PER_NODE=4 and EXPLORER_CALLS_TOTAL=6: at most 4 connections to
    either node and 6 in all are ever opened (the silent servers count them); every
    other call is -32003 busy at once (queued behind the silent calls, it would wait out
    the client's 10 s timeout), and the Unix socket answers meanwhile.
    """
    process = explorer(EXPLORER_CALLS_PER_NODE=4, EXPLORER_CALLS_TOTAL=6)
    silent = {"silent-a": SilentServer(), "silent-b": SilentServer()}
    try:
        for node_id, server in silent.items():
            result(
                process.unix,
                "explorer.heartbeat",
                heartbeat(node_id, f"tcp://127.0.0.1:{server.port}"),
            )
        fds_before = open_fds(process.pid)
        answers = []

        def attack(node_id):
            calls = batch_of(
                "explorer.call", [{"node_id": node_id, "method": "node.info"}] * 100
            )
            status, _, data = post(process.tcp, calls)
            answers.append((node_id, status, json.loads(data)))

        attackers = [
            threading.Thread(target=attack, args=(node_id,))
            for _ in range(3)
            for node_id in silent
        ]
        with Prober(process.unix) as prober:
            for thread in attackers:
                thread.start()
            # Every call placed or refused: the six allowed are at the silent nodes,
            # the four batches with none of them are answered (all busy), and the
            # prober has seen the explorer meanwhile.
            wait_for(
                lambda: (
                    sum(len(s.accepted) for s in silent.values()) >= 6
                    and len(answers) >= 4
                    and len(prober.latencies) >= 5
                ),
                what="the six calls placed and the rest refused",
            )
            accepted = {n: len(s.accepted) for n, s in silent.items()}
            fds_during = open_fds(process.pid)
            # One more call now is refused at once, not queued.
            started = time.monotonic()
            busy = rpc(
                process.unix,
                "explorer.call",
                {"node_id": "silent-a", "method": "node.info"},
            )
            took = time.monotonic() - started
            worst = prober.check(SERVED)
        assert busy["error"]["code"] == -32003 and "busy" in busy["error"]["message"]
        assert took < SERVED, took
        assert all(count <= 4 for count in accepted.values()), accepted
        assert sum(accepted.values()) == 6, accepted
        # Six connections out, and the six batches' own connections in.
        assert fds_during - fds_before <= 6 + 6 + 2, (fds_before, fds_during)
    finally:
        for server in silent.values():
            server.close()
    # The calls in flight fail once the nodes hang up, and the batches are answered.
    for thread in attackers:
        thread.join(30)
    assert len(answers) == 6
    codes = [a["error"]["code"] for _, status, batch in answers for a in batch]
    assert len(codes) == 600 and set(codes) == {-32003}
    messages = [a["error"]["message"] for _, _, batch in answers for a in batch]
    assert sum("busy" in m for m in messages) == 600 - 6, messages[:3]
    print(f"accepted {accepted}; Unix worst {worst * 1000:.0f} ms; busy call {took:.3f}")
    # Nothing stuck: a well-behaved node is still reachable through the explorer.
    assert result(process.unix, "explorer.info")["nodes"]["online"] == 2


# -- poisoning: heartbeats built to break the registry for others


POISON = {
    "gpu in capacity": ({"capacity": {"gpu": 1}}, -32602),
    "gpu 1e400": ('"capacity": {"gpu": 1e400}', -32700),
    "vcpus 1e400": ('"capacity": {"vcpus": 1e400}', -32700),
    "vcpus too large": ({"capacity": {"vcpus": 2**40}}, -32602),
    "vcpus negative": ({"usage": {"vcpus": -1}}, -32602),
    "vcpus a float": ({"capacity": {"vcpus": 1.5}}, -32602),
    "extra field": ({"evil": True}, -32602),
    "970-deep array": ('"labels": ' + "[" * 970 + "]" * 970, -32602),
    "970-deep capacity": ('"capacity": ' + "[" * 970 + "]" * 970, -32602),
    "900 kB label key": ({"labels": {"k" * 900_000: "v"}}, -32602),
    "bad label key": ({"labels": {"a b": "v"}}, -32602),
    "long label value": ({"labels": {"k": "v" * 257}}, -32602),
    "33 labels": ({"labels": {f"k{i}": "v" for i in range(33)}}, -32602),
    "label value not a string": ({"labels": {"k": {"deep": 1}}}, -32602),
    "bad node_id": ({"node_id": "../../etc/passwd"}, -32602),
    "long node_id": ({"node_id": "n" * 65}, -32602),
    "empty node_id": ({"node_id": ""}, -32602),
    "node_id not a string": ({"node_id": 1e300}, -32602),
}


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_poisoned_heartbeats_are_refused(explorer, transport):
    """
    Heartbeats with fields outside the closed set, numbers that are not finite, deep
    nesting, huge or too many labels, or a bad node id: each refused (-32602, or -32700
    for ``1e400``), none recorded, and the registry reads the same for everyone after.
    """
    process = explorer()
    uri = getattr(process, transport)
    assert result(process.unix, "explorer.heartbeat", GOOD)["accepted"] is True
    good = stable(result(process.unix, "explorer.get_node", {"node_id": "good"}))
    for what, (poison, code) in POISON.items():
        if isinstance(poison, dict):
            params = {**heartbeat("poison", "tcp://127.0.0.1:9"), **poison}
            body = json.dumps(
                {
                    "jsonrpc": "2.0",
                    "method": "explorer.heartbeat",
                    "params": params,
                    "id": 1,
                }
            )
        else:
            # Raw JSON: what json.dumps would not write (1e400), or would refuse to.
            body = (
                '{"jsonrpc": "2.0", "method": "explorer.heartbeat", "id": 1, "params": '
                '{"node_id": "poison", "socket_path": "tcp://127.0.0.1:9", ' + poison + "}}"
            )
        assert len(body) < 1024 * 1024, what
        status, _, data = post(uri, body)
        assert status == 200, (what, status, data[:200])
        answer = json.loads(data)
        assert answer.get("error", {}).get("code") == code, (what, answer)
        # The refusal may quote the bad value (schema messages do), never amplify it.
        assert len(data) < len(body) + 1024, (what, "amplified", len(data))
    nodes = result(process.unix, "explorer.list_nodes")
    assert [n["node_id"] for n in nodes] == ["good"]
    assert stable(nodes[0]) == good
    page = result(process.tcp, "explorer.query_nodes", {"limit": 10})
    assert [n["node_id"] for n in page["nodes"]] == ["good"]
    assert stable(result(process.tcp, "explorer.get_node", {"node_id": "good"})) == good
    assert result(process.tcp, "explorer.info")["nodes"]["online"] == 1


# -- flooding: new node ids without end


def test_flood_of_new_node_ids_is_bounded(explorer):
    """
    EXPLORER_NEW_NODES_PER_ADDR=50: of 200 new ids heartbeated over TCP from 127.0.0.1
    in one minute, exactly 50 are accepted and 150 refused (-32010), in far fewer than
    150 log lines; a node known before still heartbeats.  With EXPLORER_MAX_NODES=310,
    the registry filled (over Unix) refuses new ids (-32010), over Unix too, while known
    ids still heartbeat; and query_nodes pages through all 310 in a stable order, with
    no duplicates, while heartbeats go on.
    """
    process = explorer(EXPLORER_NEW_NODES_PER_ADDR=50, EXPLORER_MAX_NODES=310)
    assert result(process.unix, "explorer.heartbeat", GOOD)["accepted"] is True
    good = stable(result(process.unix, "explorer.get_node", {"node_id": "good"}))
    flood = [heartbeat(f"flood-{i:03d}", "tcp://127.0.0.1:9") for i in range(200)]
    answers = []
    with Prober(process.unix) as prober:
        for start in (0, 100):
            status, _, data = post(
                process.tcp, batch_of("explorer.heartbeat", flood[start : start + 100])
            )
            assert status == 200
            answers.extend(json.loads(data))
        # A known node is not a new id: it heartbeats on, over TCP too.
        assert result(process.tcp, "explorer.heartbeat", GOOD)["accepted"] is True
        prober.check(SERVED, at_least=1)
    accepted = [a for a in answers if "result" in a]
    refused = [a for a in answers if a.get("error", {}).get("code") == -32010]
    assert len(accepted) == 50 and len(refused) == 150, (len(accepted), len(refused))
    assert "EXPLORER_NEW_NODES_PER_ADDR" in refused[0]["error"]["message"]
    lines = [line for line in process.lines if "refused (new_nodes_per_addr)" in line]
    assert len(lines) <= 25, len(lines)

    # Fill the registry over Unix (not rate-limited): 1 + 50 + 259 = 310.
    more = [heartbeat(f"unix-{i:03d}", "tcp://127.0.0.1:9") for i in range(259)]
    for start in range(0, len(more), 100):
        status, _, data = post(
            process.unix, batch_of("explorer.heartbeat", more[start : start + 100])
        )
        assert all("result" in a for a in json.loads(data))
    full = rpc(process.unix, "explorer.heartbeat", heartbeat("one-too-many", "tcp://x:1"))
    assert full["error"]["code"] == -32010, full
    assert "EXPLORER_MAX_NODES" in full["error"]["message"]
    full = rpc(process.tcp, "explorer.heartbeat", heartbeat("one-more", "tcp://x:1"))
    assert full["error"]["code"] == -32010, full
    for known in (GOOD, more[0], flood[0]):
        assert result(process.unix, "explorer.heartbeat", known)["accepted"] is True

    def pages():
        seen, cursor = [], None
        while True:
            params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = result(process.tcp, "explorer.query_nodes", params)
            assert len(page["nodes"]) <= 100
            seen.extend(n["node_id"] for n in page["nodes"])
            cursor = page["next_cursor"]
            if cursor is None:
                return seen

    first = pages()
    # Heartbeats between two pagings change nothing of the order.
    result(process.unix, "explorer.heartbeat", more[-1])
    assert pages() == first
    assert len(first) == 310 and len(set(first)) == 310 and first == sorted(first)
    assert len(result(process.unix, "explorer.list_nodes")) == 310
    assert stable(result(process.unix, "explorer.get_node", {"node_id": "good"})) == good


def test_list_nodes_refuses_past_ten_thousand(explorer):
    """
    10,001 nodes (heartbeated over Unix in batches of 100): ``list_nodes`` refuses
    (-32010, naming query_nodes) rather than build one huge answer; query_nodes still
    pages, and get_node still answers.
    """
    process = explorer()
    conn_uri = process.unix
    for start in range(0, 10_001, 100):
        calls = batch_of(
            "explorer.heartbeat",
            [
                heartbeat(f"n{i:05d}", "tcp://127.0.0.1:9")
                for i in range(start, min(start + 100, 10_001))
            ],
        )
        status, _, data = post(conn_uri, calls)
        assert status == 200 and all("result" in a for a in json.loads(data))
    refused = rpc(process.unix, "explorer.list_nodes")
    assert refused["error"]["code"] == -32010, refused
    assert "query_nodes" in refused["error"]["message"]
    page = result(process.unix, "explorer.query_nodes", {"limit": 10_000})
    assert len(page["nodes"]) == 10_000 and page["next_cursor"] == "n09999"
    page = result(process.unix, "explorer.query_nodes", {"cursor": page["next_cursor"]})
    assert [n["node_id"] for n in page["nodes"]] == ["n10000"]
    assert page["next_cursor"] is None
    assert result(process.unix, "explorer.get_node", {"node_id": "n05000"})


# -- the resolver: names that never resolve


class TinyNode(http.server.ThreadingHTTPServer):
    """A JSON-RPC responder on 127.0.0.1 that answers every call ``{"ok": true}``."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                answer = json.dumps(
                    {"jsonrpc": "2.0", "result": {"ok": True}, "id": json.loads(body)["id"]}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        http.server.ThreadingHTTPServer.__init__(self, ("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def silent_dns(short_tmp):
    """
    A command prefix running twistd with a resolv.conf of its own (in a mount namespace)
    whose name server, a UDP socket on port 53 of a loopback address of this run's own
    (127.x.y.z from the pid), never answers: every name not in /etc/hosts hangs for 6 s.
    Root only.
    """
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a mount namespace and port 53 need root and unshare")
    if socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)[0][4][0] != "127.0.0.1":
        pytest.skip("localhost is not 127.0.0.1 first here")
    # resolv.conf takes no port, so the address is what is ours: 127.0.0.1:53 was
    # taken whenever another run of this test (or a local resolver) held it.
    pid = os.getpid()
    address = f"127.{(pid >> 16) & 255}.{(pid >> 8) & 255}.{pid & 255}"
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        dns.bind((address, 53))
    except OSError as e:
        pytest.skip(f"cannot bind {address}:53: {e}")
    conf = f"{short_tmp}/resolv.conf"
    with open(conf, "w") as f:
        f.write(f"nameserver {address}\noptions timeout:6 attempts:1\n")
    dns.setblocking(False)
    yield _SilentDNS(
        [
            "unshare",
            "--mount",
            "--",
            "sh",
            "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"',
            conf,
        ],
        dns,
    )
    dns.close()


class _SilentDNS(list):
    """The command prefix, and the names its name server was asked for so far."""

    def __init__(self, prefix, server):
        super().__init__(prefix)
        self._server = server
        self._names = set()

    def names_asked(self):
        """:return: the ``dead-NN`` names queried so far (each query is read once)"""
        while True:
            try:
                query = self._server.recv(512)
            except BlockingIOError:
                return self._names
            self._names.update(re.findall(rb"dead-[0-9]+", query))


def test_dead_names_do_not_starve_live_ones(explorer, silent_dns):
    """
    Twelve nodes advertise names whose lookups hang (``tcp://dead-N.invalid:1``): while
    their calls wait on the resolver, a call to a node at ``tcp://localhost:PORT`` is
    answered well within their 5 s (it does not queue behind them); the dead calls fail
    (-32003) after the resolver's 5 s, and a second round fails at once, from the cache,
    not another 5 s.
    """
    process = explorer(prefix=silent_dns)
    live = TinyNode()
    try:
        result(
            process.unix,
            "explorer.heartbeat",
            heartbeat("live", f"tcp://localhost:{live.port}"),
        )
        dead = [f"dead-{i:02d}" for i in range(12)]
        for node_id in dead:
            result(
                process.unix,
                "explorer.heartbeat",
                heartbeat(node_id, f"tcp://{node_id}.invalid:1"),
            )
        calls = batch_of(
            "explorer.call", [{"node_id": n, "method": "node.info"} for n in dead]
        )
        first = {}

        def round_one():
            started = time.monotonic()
            first["answer"] = json.loads(post(process.tcp, calls)[2])
            first["took"] = time.monotonic() - started

        attack = threading.Thread(target=round_one)
        attack.start()
        # The twelve lookups are under way: their queries reached the name server.
        wait_for(lambda: len(silent_dns.names_asked()) >= 12, what="the twelve lookups")
        started = time.monotonic()
        answer = result(
            process.unix, "explorer.call", {"node_id": "live", "method": "node.info"}
        )
        live_took = time.monotonic() - started
        assert answer == {"ok": True}
        assert attack.is_alive(), "the dead names did not hang"
        # Half the 5 s a call queued behind the dead lookups would wait: 1 s was a
        # tight margin on a loaded machine for a call that takes milliseconds.
        assert live_took < 2.5, live_took
        attack.join(15)
        assert [a["error"]["code"] for a in first["answer"]] == [-32003] * 12
        assert all("within" in a["error"]["message"] for a in first["answer"])
        assert 4 < first["took"] < 8, first["took"]
        # Round two: cached failures, at once.
        started = time.monotonic()
        again = json.loads(post(process.tcp, calls)[2])
        second = time.monotonic() - started
        assert [a["error"]["code"] for a in again] == [-32003] * 12
        assert second < 2.5, second
        assert result(
            process.unix, "explorer.call", {"node_id": "live", "method": "node.info"}
        ) == {"ok": True}
        print(
            f"live call {live_took:.3f} s; dead names {first['took']:.1f} s, "
            f"then {second:.3f} s"
        )
    finally:
        live.shutdown()
        live.server_close()
