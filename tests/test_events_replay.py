"""
Replay of the event stream (CONTRACT §10, §7) against a real ``twistd explorer`` with
its 10,000-event ring full: readers of ``?since=0`` that never read starve nobody and
are closed with 1008; a reader that reads gets the replay, then live events, each once.
"""

import json
import select
import socket
import time

from hero_compute.explorer.events import KEEP, STALL

from .support import connect, parse_address, result
from .test_events import explorer, frames
from .wsclient import WsClient

__all__ = ["explorer"]  # the fixture, shared

#: Readers that never read (bounded: the per-address limit is 1,024).
READERS = 50

#: Nodes whose heartbeats make the events; each beat flips its node's vm_count.
NODES = 5


class Beats:
    """Heartbeats over one Unix connection, each making exactly one event once the
    nodes are known (a vm_count flip: vm.created or vm.deleted)."""

    def __init__(self, uri):
        self.conn = connect(uri, timeout=60)
        self.counts = {}

    def send(self, count):
        """``count`` heartbeats, in batches of 100."""
        while count > 0:
            batch = []
            for i in range(min(count, 100)):
                node_id = f"ev-{i % NODES}"
                self.counts[node_id] = 1 - self.counts.get(node_id, 1)
                params = {
                    "node_id": node_id,
                    "socket_path": "unix:///tmp/hc-nowhere.sock",
                    "vm_count": self.counts[node_id],
                }
                batch.append(
                    {
                        "jsonrpc": "2.0",
                        "id": i,
                        "method": "explorer.heartbeat",
                        "params": params,
                    }
                )
            self.conn.request(
                "POST", "/rpc", json.dumps(batch), {"content-type": "application/json"}
            )
            answers = json.loads(self.conn.getresponse().read())
            assert all("result" in a for a in answers), answers[:2]
            count -= len(batch)

    def close(self):
        """Close the connection."""
        self.conn.close()


def fill_ring(unix):
    """Make more events than the ring keeps (it then holds KEEP, the oldest gone)."""
    beats = Beats(unix)
    try:
        beats.send(KEEP + 400)
    finally:
        beats.close()


def silent_reader(uri):
    """A ``?since=0`` reader that sends its upgrade and reads nothing (not even the
    answer).  Its receive buffer is the default one: a tiny one would fill as well,
    but then Linux reopens its window so slowly that the test could not read the close
    in time."""
    address = parse_address(uri)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.connect((address.host, address.port))
    sock.sendall(
        b"GET /v1/events?since=0 HTTP/1.1\r\nHost: localhost\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    return sock


def server_frames(data):
    """The ``(opcode, payload)`` of the whole server frames in ``data`` (after the head)."""
    out, i = [], 0
    while i + 2 <= len(data):
        size, at = data[i + 1] & 0x7F, i + 2
        if size == 126:
            size, at = int.from_bytes(data[i + 2 : i + 4], "big"), i + 4
        elif size == 127:
            size, at = int.from_bytes(data[i + 2 : i + 10], "big"), i + 10
        if at + size > len(data):
            break
        out.append((data[i] & 0x0F, bytes(data[at : at + size])))
        i = at + size
    return out


def read_all(socks, deadline):
    """Read every socket to its end (EOF or reset) before ``deadline``; the bytes."""
    got = {s: bytearray() for s in socks}
    open_ = set(socks)
    for s in socks:
        s.setblocking(False)
    while open_ and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_), [], [], 0.2)
        for s in ready:
            try:
                data = s.recv(1 << 20)
            except ConnectionResetError:
                data = b""
            if data:
                got[s] += data
            else:
                open_.discard(s)
    assert not open_, f"{len(open_)} readers still open"
    return [bytes(got[s]) for s in socks]


def test_replay_readers_that_never_read_starve_nobody_and_are_closed_with_1008(explorer):
    """With the ring full, 50 ?since=0 readers that read nothing: explorer.info over
    Unix still answers within 1 s (the old code, replaying 10,000 frames each at once:
    3 s or more), and each is closed with 1008 (its part of the replay in order before
    the close) and cut within STALL + 5 s."""
    fill_ring(explorer.unix)
    socks = []
    try:
        started = time.monotonic()
        socks = [silent_reader(explorer.tcp) for _ in range(READERS)]
        took = time.monotonic()
        assert result(explorer.unix, "explorer.info", timeout=60)
        took = time.monotonic() - took
        assert took < 1.0, f"explorer.info took {took:.1f} s behind {READERS} replays"
        # Read nothing until each has been closed for being stuck (STALL after its
        # connection filled, within a second or two of opening even on a loaded
        # machine), then take what was sent before the close is given up on (5 s
        # after it): reading sooner would make it a reader that reads.
        time.sleep(max(started + STALL + 2.5 - time.monotonic(), 0))
        everything = read_all(socks, started + STALL + 5)
    finally:
        for s in socks:
            s.close()
    for data in everything:
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head[:100]
        messages = server_frames(rest)
        assert messages and messages[-1][0] == 8, "no close frame"
        assert int.from_bytes(messages[-1][1][:2], "big") == 1008
        assert b"too slow" in messages[-1][1]
        seqs = [json.loads(payload)["seq"] for _, payload in messages[:-1]]
        assert seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        # Less than the whole replay: the close ended it.
        assert len(seqs) < KEEP


def test_a_replaying_reader_gets_every_event_once_in_order_then_live(explorer):
    """A ?since=0 reader that reads gets the 10,000 events held, in order, with the
    events made during its replay and after it, each exactly once (none lost or
    repeated where the replay meets the live stream)."""
    beats = Beats(explorer.unix)
    try:
        beats.send(KEEP + 400)
        reader = WsClient(explorer.tcp, "/v1/events?since=0", rcvbuf=16384)
        try:
            had = []
            for k in range(20):
                # Events made while it is still replaying, then a little reading.
                had.append(reader.received.count(b'"seq"'))
                beats.send(50)
                result(explorer.unix, "explorer.revoke", {"node_id": f"mid-{k}"})
                reader.pump(time.monotonic() + 0.02)
            result(explorer.unix, "explorer.revoke", {"node_id": "the-end"})
            reader.read_until(b'"node_id":"the-end"', timeout=60)
            # Then live, once caught up.
            beats.send(10)
            result(explorer.unix, "explorer.revoke", {"node_id": "live"})
            reader.read_until(b'"node_id":"live"', timeout=30)
            reader.pump(time.monotonic() + 0.3)
            got = frames(reader)
        finally:
            reader.close()
    finally:
        beats.close()
    seqs = [e["seq"] for e in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    marks = {e["node_id"]: e["seq"] for e in got if e["type"] == "node.revoked"}
    # Each batch: 50 heartbeats, one event each, then its mark.
    opened_at = marks["mid-0"] - 51
    assert seqs[0] == opened_at - KEEP + 1
    assert seqs[-1] == marks["live"] == marks["the-end"] + 11
    assert marks["mid-19"] == opened_at + 20 * 51
    # The reader was still in its replay when the last batch was made.
    assert had[-1] < marks["mid-18"] - seqs[0]
