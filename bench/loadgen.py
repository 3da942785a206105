"""
A small, efficient HTTP/1.1 JSON-RPC load generator (asyncio Protocols, raw bytes).

Run as a separate process by :obj:`bench.run`; it prints one JSON object on stdout.

Modes:

- ``closed``: ``--conns`` connections in a closed loop (send, await the response, send
  again), either persistent or with a new connection per request (``--close``).  Works
  over Unix sockets and TCP alike, so Unix vs TCP is measured with the same client.
- ``heartbeat``: simulated nodes, each heartbeating every ``--interval`` seconds on a
  fixed, phase-spread schedule (open loop) over persistent TCP connections.  Delta
  heartbeats (SPEC-delta): a node's first heartbeat is full; once an answer carries a
  ``session``, the next ones carry it and only ``node_id`` and ``socket_path`` (nothing
  else of a simulated node ever changes); a delta answered with an error is resent in
  full at once, and a lost connection forgets the session.  An explorer that answers
  no ``session`` gets full heartbeats only, as does everyone with ``--full``.  A lost
  connection is opened again when the next heartbeat is due on it; ``stop`` on stdin
  ends the run early.
- ``pages``: one keep-alive Unix connection paging through ``explorer.query_nodes``
  (``--limit`` per page, following ``next_cursor`` and wrapping around) at ``--rate``
  calls a second, bounded by ``--count`` and ``--duration``.

Either mode speaks mutual TLS with ``--tls-ca``: ``closed`` with one client certificate
(``--tls-cert``, certificate and key in one PEM file; with ``--close`` every request
is a fresh, full handshake), ``heartbeat`` with one connection per node, each with its
own SSL context and node certificate ``--tls-dir/<node index>.pem`` (node id = the
certificate's name), reporting ``tls://127.0.0.1:<port>`` as its address.

Latencies go into a log-bucketed histogram (2% buckets) so that processes can be merged.
"""

import argparse
import asyncio
import gc
import json
import os
import time

from hbgen import HeartbeatGen
from loadcore import (
    Histogram,
    Parser,
    Stats,
    client_context,
    cpu_seconds,
    http_request,
    raise_nofile,
)

# ---------------------------------------------------------------- closed loop


class _ClosedConn(asyncio.Protocol):
    """One closed-loop client connection (persistent: many requests)."""

    def __init__(self, runner, opened_at=0.0):
        self.r = runner
        self.parser = Parser()
        self.sent_at = 0.0
        self.opened_at = opened_at  # when connecting began (for the whole cycle)
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.send()

    def send(self):
        self.sent_at = time.perf_counter()
        self.transport.write(self.r.next_request())

    def data_received(self, data):
        for status, body in self.parser.feed(data):
            now = time.perf_counter()
            self.r.record(now, now - self.sent_at, status, body, now - self.opened_at)
            if self.r.running:
                if self.r.close:
                    self.transport.close()
                    return
                self.send()
            else:
                self.transport.close()
                return

    def connection_lost(self, exc):
        self.r.lost(self)


class ClosedLoop:
    def __init__(self, args):
        self.args = args
        self.close = args.close
        self.request = http_request(args.body.encode(), close=args.close)
        self.expect = args.expect.encode() if args.expect else None
        self.stats = Stats()
        self.cycle = Histogram()
        self.running = True
        self.measure_from = 0.0
        self.measure_to = 0.0
        self.loop = None
        self.active = 0
        self.src_i = 0
        self.srcs = args.src or []
        self.ssl = client_context(args.tls_ca, args.tls_cert) if args.tls_ca else None
        # --heartbeats: full heartbeats of that many node ids, round-robin
        self.requests = None
        self.sent = 0
        self.answered = 0
        self.primed = None
        if args.heartbeats:
            ids = _Ids(argparse.Namespace(first=0, tls_dir=None))
            self.requests = [
                http_request(HeartbeatGen.full_body(ids, i)) for i in range(args.heartbeats)
            ]

    def next_request(self):
        if self.requests is None:
            return self.request
        self.sent += 1
        if self.args.prime and self.sent >= len(self.requests):
            self.running = False  # each id once: this is the last
        return self.requests[(self.sent - 1) % len(self.requests)]

    def record(self, now, latency, status, body, cycle):
        self.answered += 1
        if self.primed is not None and self.answered >= len(self.requests):
            self.primed.set()
        if not (self.measure_from <= now < self.measure_to):
            return
        if status != 200 or (self.expect and self.expect not in body):
            self.stats.error(f"{status} {body[:200]!r}")
            return
        self.stats.ok += 1
        self.stats.hist.add(latency)
        if self.close:
            # connect (and TLS handshake) + request + response: latency counts from
            # the request's write only, as wrk does
            self.cycle.add(cycle)

    def lost(self, proto):
        self.active -= 1
        if self.running:
            self.loop.create_task(self.open())

    async def open(self):
        a = self.args
        t = time.perf_counter()
        try:
            if a.unix:
                await self.loop.create_unix_connection(lambda: _ClosedConn(self, t), a.unix)
            else:
                kw = {}
                if self.srcs:
                    kw["local_addr"] = (self.srcs[self.src_i % len(self.srcs)], 0)
                    self.src_i += 1
                if self.ssl:
                    kw["ssl"] = self.ssl
                    kw["server_hostname"] = a.host
                await self.loop.create_connection(
                    lambda: _ClosedConn(self, t), a.host, a.port, **kw
                )
            self.active += 1
        except OSError as e:
            self.stats.conn_errors += 1
            if len(self.stats.error_samples) < 5:
                self.stats.error_samples.append(f"connect: {e}")
            if self.running:
                await asyncio.sleep(0.01)
                self.loop.create_task(self.open())

    async def run(self):
        a = self.args
        self.loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        self.measure_from = t0 + a.warmup
        self.measure_to = self.measure_from + a.duration
        if a.prime:
            # Register every id once (as fast as the server answers), then stop.
            self.primed = asyncio.Event()
            self.measure_from, self.measure_to = t0, float("inf")
        for _ in range(a.conns):
            self.loop.create_task(self.open())
        if a.prime:
            try:
                await asyncio.wait_for(self.primed.wait(), a.duration)
            except TimeoutError:
                pass
            self.running = False
            s = self.stats
            return {
                "ok": s.ok,
                "errors": s.errors,
                "error_samples": s.error_samples,
                "primed": self.primed.is_set(),
                "seconds": round(time.perf_counter() - t0, 2),
            }
        await asyncio.sleep(a.warmup)
        c0 = cpu_seconds()
        await asyncio.sleep(a.duration)
        c1 = cpu_seconds()
        self.running = False
        await asyncio.sleep(0.2)
        s = self.stats
        return {
            "ok": s.ok,
            "errors": s.errors,
            "conn_errors": s.conn_errors,
            "error_samples": s.error_samples,
            "duration": a.duration,
            "cpu_s": c1 - c0,
            "hist": s.hist.to_json(),
            "cycle": self.cycle.to_json(),
        }


class _Ids:
    """What :meth:`HeartbeatGen.full_body` needs of a generator: node ids from 0."""

    address = HeartbeatGen.address

    def __init__(self, a):
        self.a = a


# ---------------------------------------------------------------- pages


class Pages:
    """
    A paging client on one keep-alive connection: ``--method`` with ``limit`` and the
    last ``next_cursor`` (wrapping around at the end), ``--rate`` calls a second from
    ``--start`` for ``--duration`` seconds, at most ``--count``; latency from writing
    the request to the last byte of its answer (decoding it is not counted).
    """

    def __init__(self, args):
        self.a = args

    async def run(self):
        a = self.a
        start = a.start or time.time()
        stop = start + a.duration
        reader, writer = await asyncio.open_unix_connection(a.unix, limit=1 << 26)
        hist = Histogram()
        lat = []
        errors, samples, wraps, nodes, size = 0, [], 0, 0, 0
        cursor = None
        late = 0
        for k in range(a.count):
            due = start + k / a.rate
            if due >= stop:
                break
            now = time.time()
            if due > now:
                await asyncio.sleep(due - now)
            elif now - due > 1.0 / a.rate:
                late += 1
            if a.params:
                # A fixed call (explorer.place): no pages to follow.
                params = json.loads(a.params)
            else:
                params = {"limit": a.limit}
            if cursor:
                params["cursor"] = cursor
            body = json.dumps(
                {"jsonrpc": "2.0", "method": a.method, "id": k, "params": params}
            ).encode()
            t = time.perf_counter()
            writer.write(http_request(body))
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            payload = await reader.readexactly(length)
            took = time.perf_counter() - t
            msg = json.loads(payload)
            if "result" not in msg:
                errors += 1
                if len(samples) < 3:
                    samples.append(str(msg.get("error"))[:300])
                cursor = None
                continue
            hist.add(took)
            lat.append(round(took * 1000, 3))
            size += len(payload)
            if a.params:
                continue
            nodes += len(msg["result"]["nodes"])
            cursor = msg["result"]["next_cursor"]
            if cursor is None:
                wraps += 1
        writer.close()
        return {
            "ok": len(lat),
            "errors": errors,
            "error_samples": samples,
            "duration": a.duration,
            "hist": hist.to_json(),
            "max_ms": max(lat, default=None),
            "nodes": nodes,
            "bytes": size,
            "wraps": wraps,
            "late": late,
            "start": a.start,
        }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=["closed", "heartbeat", "pages"])
    p.add_argument("--unix", help="Unix socket path")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    p.add_argument("--src", action="append", help="source address (repeatable)")
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--close", action="store_true", help="new connection per request")
    p.add_argument("--body", default='{"jsonrpc":"2.0","method":"explorer.info","id":1}')
    p.add_argument("--expect", default='"result"')
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument(
        "--heartbeats",
        type=int,
        default=0,
        help="closed: full heartbeats of this many node ids, round-robin, not --body",
    )
    p.add_argument(
        "--prime",
        action="store_true",
        help="closed --heartbeats: send each id once (within --duration), then stop",
    )
    # heartbeat mode
    p.add_argument("--nodes", type=int, default=1000, help="nodes in this generator")
    p.add_argument(
        "--first", type=int, default=0, help="index of this generator's first node"
    )
    p.add_argument("--total-nodes", type=int, default=0)
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--connect-concurrency", type=int, default=128)
    p.add_argument("--connect-timeout", type=float, default=90.0)
    p.add_argument("--tls-ca", help="speak TLS, trusting this CA")
    p.add_argument("--tls-cert", help="closed: our certificate and key (one PEM file)")
    p.add_argument("--tls-dir", help="heartbeat: <node index>.pem for each node")
    p.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="heartbeat: seconds to wait for an answer before dropping the connection "
        "[default: the interval, at most 10 s, as a node]",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="heartbeat: always full heartbeats, never a session (an old node)",
    )
    # pages mode
    p.add_argument("--method", default="explorer.query_nodes")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--params", help="pages: these params (JSON) in every call, no paging")
    p.add_argument("--rate", type=float, default=5.0, help="pages: calls per second")
    p.add_argument("--count", type=int, default=100, help="pages: at most this many")
    p.add_argument("--start", type=float, help="pages: Unix time of the first call")
    a = p.parse_args(argv)
    a.total_nodes = a.total_nodes or a.nodes
    nofile = raise_nofile()
    # The generator's own collector pauses (0.15-0.2 s with 9,000 connections open)
    # would be counted as the server's latency.  A run is bounded, and what it leaves
    # to the cycle collector is small.
    gc.disable()
    if a.mode == "closed":
        result = asyncio.run(ClosedLoop(a).run())
    elif a.mode == "pages":
        result = asyncio.run(Pages(a).run())
    else:
        result = asyncio.run(HeartbeatGen(a).run())
    result["nofile"] = nofile
    result["pid"] = os.getpid()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
