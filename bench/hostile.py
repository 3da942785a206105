"""
Hostile peers for the limits benchmark (CONTRACT §7), bounded in time and bytes.

- ``pipeline``: one connection that pipelines ``rpc.discover`` requests as fast as the
  socket takes them and never reads a byte of the answers (stops at ``--max-bytes``).
- ``slowloris``: ``--conns`` connections, each sending one byte of a request head that
  never ends every ``--every`` seconds; a connection the server closes is opened again.

Runs for ``--duration`` seconds and prints one JSON object on stdout: what it managed
to send, and how the server answered (closes, 408s seen).
"""

import argparse
import json
import os
import select
import socket
import time

_BODY = b'{"jsonrpc":"2.0","method":"rpc.discover","id":1}'
DISCOVER = (
    b"POST /rpc HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)
#: a request head that would be valid, if it ever ended
HEAD = (
    b"POST /rpc HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    b"X-Padding: " + b"a" * 4000
)


def _connect(a):
    s = socket.socket()
    s.bind((a.src, 0))
    s.settimeout(5)
    s.connect((a.host, a.port))
    s.setblocking(False)
    return s


def pipeline(a):
    """Write pipelined requests until the socket stops taking them; never read."""
    s = _connect(a)
    end = time.monotonic() + a.duration
    sent = 0
    # (time since start, bytes sent) whenever 1 MiB more got through: the plateau shows
    # the server's backpressure
    progress = []
    t0 = time.monotonic()
    chunk = DISCOVER * 64
    mark = 0
    stalled_since = None
    while time.monotonic() < end and sent < a.max_bytes:
        _, w, _ = select.select([], [s], [], 0.2)
        if not w:
            stalled_since = stalled_since or time.monotonic()
            continue
        try:
            n = s.send(chunk)
        except BlockingIOError:
            continue
        except OSError as e:
            progress.append((round(time.monotonic() - t0, 2), sent, f"error {e}"))
            break
        sent += n
        stalled_since = None
        if sent - mark >= 1 << 20:
            mark = sent
            progress.append((round(time.monotonic() - t0, 2), sent))
    s_recvbuf = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    s.close()
    return {
        "mode": "pipeline",
        "bytes_sent": sent,
        "requests_sent": sent // len(DISCOVER),
        "stalled_for_s": round(time.monotonic() - stalled_since, 1) if stalled_since else 0,
        "progress": progress[-8:],
        "rcvbuf": s_recvbuf,
    }


def slowloris(a):
    """Trickle unfinished heads on several connections; reopen what the server closes."""
    end = time.monotonic() + a.duration
    conns = {}  # socket -> bytes of HEAD sent
    opened = closed = answered_408 = answered_other = refused = 0
    lifetimes = []
    born = {}
    nxt = time.monotonic()
    while time.monotonic() < end:
        while len(conns) < a.conns and time.monotonic() < end:
            try:
                s = _connect(a)
            except OSError:
                refused += 1
                time.sleep(0.1)
                break
            conns[s] = 0
            born[s] = time.monotonic()
            opened += 1
        timeout = max(0.0, min(nxt, end) - time.monotonic())
        r, _, _ = select.select(list(conns), [], [], timeout)
        for s in r:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 408"):
                answered_408 += 1
            elif data:
                answered_other += 1
            if data:
                continue  # the close follows
            closed += 1
            lifetimes.append(time.monotonic() - born.pop(s))
            del conns[s]
            s.close()
        if time.monotonic() >= nxt:
            nxt += a.every
            for s, i in list(conns.items()):
                try:
                    s.send(HEAD[i % len(HEAD) : i % len(HEAD) + 1])
                    conns[s] = i + 1
                except OSError:
                    pass
    for s in conns:
        s.close()
    lifetimes.sort()
    return {
        "mode": "slowloris",
        "opened": opened,
        "closed_by_server": closed,
        "answered_408": answered_408,
        "answered_other": answered_other,
        "connect_failed": refused,
        "median_lifetime_s": round(lifetimes[len(lifetimes) // 2], 1)
        if lifetimes
        else None,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=["pipeline", "slowloris"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--src", default="127.0.0.1")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--every", type=float, default=3.0)
    p.add_argument("--max-bytes", type=int, default=256 << 20)
    p.add_argument("--delay", type=float, default=0.0, help="seconds before starting")
    a = p.parse_args(argv)
    time.sleep(a.delay)
    a.duration -= a.delay
    result = pipeline(a) if a.mode == "pipeline" else slowloris(a)
    result["pid"] = os.getpid()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
