"""
The event stream (CONTRACT §10) from the outside: a WebSocket client at ``/v1/events``
of a real ``twistd explorer``, replay with ``?since=``, a slow reader closed with 1008,
and ``hero-compute events``.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from .support import ROOT, connect, result, rpc
from .wsclient import WsClient, refusal


@pytest.fixture
def explorer(twistd, short_tmp):
    """A real explorer on its Unix socket and loopback TCP."""
    process = twistd(
        ["explorer"],
        env={"HERO_SOCKET_DIR": short_tmp, "EXPLORER_TCP_ADDR": "127.0.0.1:0"},
    )
    uris = process.listening(count=2)
    process.unix = next(u for u in uris if u.startswith("unix://"))
    process.tcp = next(u for u in uris if u.startswith("tcp://"))
    return process


def frames(client):
    """The JSON events a client received so far, in order."""
    text, decoder, out, i = client.received.decode(), json.JSONDecoder(), [], 0
    while i < len(text):
        try:
            event, i = decoder.raw_decode(text, i)
        except ValueError:
            break  # the rest of a message still on its way (wsproto hands parts)
        out.append(event)
    return out


def wait_events(client, count, timeout=10.0):
    """Read until ``count`` events arrived; :return: them."""
    deadline = time.monotonic() + timeout
    while len(frames(client)) < count:
        assert time.monotonic() < deadline, f"only {frames(client)} arrived"
        client.pump(deadline)
    return frames(client)


def beat(uri, node_id):
    """A heartbeat without a secret."""
    params = {"node_id": node_id, "socket_path": "unix:///tmp/hc-nowhere.sock"}
    return result(uri, "explorer.heartbeat", params)


def test_node_events_in_order_and_replayed(explorer):
    """online, revoked (with its actor), offline on leave and removed arrive in order,
    seq growing by one; a reader with ?since=N gets exactly the events after N."""
    client = WsClient(explorer.unix, "/v1/events")
    try:
        beat(explorer.unix, "n1")
        result(explorer.unix, "explorer.revoke", {"node_id": "n2"})
        beat(explorer.unix, "n3")
        result(explorer.unix, "explorer.leave", {"node_id": "n3"})
        result(explorer.unix, "explorer.remove_node", {"node_id": "n1"})
        got = wait_events(client, 5)
    finally:
        client.close()
    assert [(e["type"], e.get("node_id")) for e in got] == [
        ("node.online", "n1"),
        ("node.revoked", "n2"),
        ("node.online", "n3"),
        ("node.offline", "n3"),
        ("node.removed", "n1"),
    ]
    assert [e["seq"] for e in got] == [1, 2, 3, 4, 5]
    assert got[1]["actor"] == f"unix:{os.getuid()}"
    assert got[3]["data"] == {"reason": "left"}
    replay = WsClient(explorer.unix, "/v1/events?since=3")
    try:
        assert [e["seq"] for e in wait_events(replay, 2)] == [4, 5]
        replay.pump(time.monotonic() + 0.3)
        assert len(frames(replay)) == 2
    finally:
        replay.close()


def test_vm_events_from_proxied_calls_and_a_bad_since(explorer):
    """A proxied VM call that fails makes no event; a since that is not a number is
    refused with 400; plain TCP may read the stream (as it may query_nodes)."""
    client = WsClient(explorer.tcp, "/v1/events?since=0")
    try:
        rpc(explorer.unix, "explorer.call", {"node_id": "nope", "method": "vm.start"})
        beat(explorer.unix, "n9")
        got = wait_events(client, 1)
    finally:
        client.close()
    assert [e["type"] for e in got] == ["node.online"]
    assert refusal(explorer.unix, "/v1/events?since=abc") == 400


def test_a_slow_reader_is_closed_with_1008_and_resumes_with_since(explorer):
    """A reader that stops reading while thousands of events flow is closed with 1008
    (the explorer does not wait for it, nor grow its buffer without end); it resumes
    with ?since=<last seq it got> and misses nothing."""
    slow = WsClient(explorer.unix, "/v1/events?since=0", rcvbuf=4096)
    conn = connect(explorer.unix)
    total = 0
    started = time.monotonic()
    try:
        for batch in range(100):
            body = [
                {
                    "jsonrpc": "2.0",
                    "id": i,
                    "method": "explorer.heartbeat",
                    "params": {
                        "node_id": f"flood-{batch:03d}-{i:03d}-" + "x" * 40,
                        "socket_path": "unix:///tmp/hc-nowhere.sock",
                    },
                }
                for i in range(100)
            ]
            answers = _post(conn, body)
            assert all("result" in a for a in answers)
            total += len(body)
    finally:
        conn.close()
    # The explorer kept serving while the reader sat still.
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 30
    while slow.close_code is None and time.monotonic() < deadline:
        assert slow.pump(deadline)
    assert slow.close_code == 1008
    got = frames(slow)
    slow.close()
    assert got and [e["seq"] for e in got] == list(range(1, len(got) + 1))
    resumed = WsClient(explorer.unix, f"/v1/events?since={got[-1]['seq']}")
    try:
        rest = wait_events(resumed, total - len(got), timeout=30)
    finally:
        resumed.close()
    assert [e["seq"] for e in got + rest] == list(range(1, total + 1))


def _post(conn, body):
    """POST a JSON-RPC batch on a kept connection; the answers."""
    conn.request("POST", "/rpc", json.dumps(body), {"content-type": "application/json"})
    return json.loads(conn.getresponse().read())


def test_cli_events(explorer):
    """``hero-compute events --since 0`` prints the held events as JSON lines and exits
    0; ``--since 1`` leaves the first out."""
    beat(explorer.unix, "c1")
    beat(explorer.unix, "c2")
    env = {**os.environ, "PYTHONPATH": ROOT}
    base = [sys.executable, "-m", "hero_compute.cli", "--explorer", explorer.unix]
    done = subprocess.run(
        [*base, "events"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(e["type"], e["node_id"]) for e in lines] == [
        ("node.online", "c1"),
        ("node.online", "c2"),
    ]
    done = subprocess.run(
        [*base, "events", "--since", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert [json.loads(line)["node_id"] for line in done.stdout.splitlines()] == ["c2"]


def test_vm_count_changes_in_heartbeats_are_vm_events(explorer):
    """A heartbeat reporting more VMs makes vm.created, fewer vm.deleted, with the
    counts; an unchanged count makes nothing."""
    client = WsClient(explorer.unix, "/v1/events")
    try:
        for count in (0, 2, 2, 1):
            result(
                explorer.unix,
                "explorer.heartbeat",
                {"node_id": "v1", "socket_path": "unix:///tmp/x.sock", "vm_count": count},
            )
        got = wait_events(client, 3)
        client.pump(time.monotonic() + 0.3)
    finally:
        client.close()
    assert [(e["type"], e["data"]) for e in frames(client)] == [
        ("node.online", {}),
        ("vm.created", {"vm_count": 2, "was": 0}),
        ("vm.deleted", {"vm_count": 1, "was": 2}),
    ]
    assert got
