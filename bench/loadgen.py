"""
A small, efficient HTTP/1.1 JSON-RPC load generator (asyncio Protocols, raw bytes).

Run as a separate process by :obj:`bench.run`; it prints one JSON object on stdout.

Modes:

- ``closed``: ``--conns`` connections in a closed loop (send, await the response, send
  again), either persistent or with a new connection per request (``--close``).  Works
  over Unix sockets and TCP alike, so Unix vs TCP is measured with the same client.
- ``heartbeat``: simulated nodes, each heartbeating every ``--interval`` seconds on a
  fixed, phase-spread schedule (open loop) over persistent TCP connections.

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
import math
import os
import resource
import ssl
import sys
import time

_LOG_BASE = math.log(1.02)


class Histogram:
    """Latency histogram in 2% buckets, in seconds."""

    def __init__(self):
        self.buckets = {}
        self.count = 0

    def add(self, seconds):
        b = int(math.log(max(seconds, 1e-7) * 1e7) / _LOG_BASE)
        self.buckets[b] = self.buckets.get(b, 0) + 1
        self.count += 1

    def to_json(self):
        return {str(k): v for k, v in self.buckets.items()}


def merge_histograms(dicts):
    """Merge histogram dicts (as produced by :obj:`Histogram.to_json`)."""
    out = {}
    for d in dicts:
        for k, v in d.items():
            out[int(k)] = out.get(int(k), 0) + v
    return out


def percentile(buckets, q):
    """:return: the q-quantile (0..1) in seconds of a merged histogram, or None."""
    total = sum(buckets.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for k in sorted(buckets):
        seen += buckets[k]
        if seen >= rank:
            return math.exp((k + 0.5) * _LOG_BASE) / 1e7
    return None


def raise_nofile():
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def client_context(ca, certfile=None):
    """A TLS client context trusting the fleet CA, with our certificate if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    if certfile:
        ctx.load_cert_chain(certfile)
    return ctx


def http_request(body, close=False, host=b"bench"):
    return (
        b"POST /rpc HTTP/1.1\r\nHost: "
        + host
        + b"\r\nContent-Type: application/json\r\n"
        + (b"Connection: close\r\n" if close else b"")
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


class _Parser:
    """Incremental parser of HTTP/1.1 responses with a Content-Length."""

    __slots__ = ("buf",)

    def __init__(self):
        self.buf = b""

    def feed(self, data):
        """:return: list of (status, body) of complete responses"""
        self.buf += data
        out = []
        while True:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            head = buf[:end]
            i = head.find(b"\ncontent-length:")
            if i < 0:
                i = head.lower().find(b"\ncontent-length:")
            if i < 0:
                length = 0
            else:
                j = head.find(b"\r", i + 16)
                length = int(head[i + 16 : j if j >= 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                return out
            status = int(head[9:12])
            out.append((status, buf[end + 4 : total]))
            self.buf = buf[total:]


class Stats:
    def __init__(self):
        self.hist = Histogram()
        self.ok = 0
        self.errors = 0
        self.error_samples = []
        self.conn_errors = 0
        self.lateness = Histogram()

    def error(self, what):
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:300])


# ---------------------------------------------------------------- closed loop


class _ClosedConn(asyncio.Protocol):
    """One closed-loop client connection (persistent: many requests)."""

    def __init__(self, runner, opened_at=0.0):
        self.r = runner
        self.parser = _Parser()
        self.sent_at = 0.0
        self.opened_at = opened_at  # when connecting began (for the whole cycle)
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.send()

    def send(self):
        self.sent_at = time.perf_counter()
        self.transport.write(self.r.request)

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

    def record(self, now, latency, status, body, cycle):
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
        for _ in range(a.conns):
            self.loop.create_task(self.open())
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


# ---------------------------------------------------------------- heartbeats


class _HbConn(asyncio.Protocol):
    """A persistent connection carrying the heartbeats of one or more nodes."""

    def __init__(self, gen):
        self.g = gen
        self.parser = _Parser()
        self.queue = []  # (scheduled, node index)
        self.inflight = None  # (scheduled, sent_at, node)
        self.transport = None
        self.connected = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        if not self.connected.done():
            self.connected.set_result(True)

    def enqueue(self, scheduled, node):
        if self.inflight is None and self.transport is not None:
            self._send(scheduled, node)
        else:
            self.queue.append((scheduled, node))

    def _send(self, scheduled, node):
        now = time.time()
        self.inflight = (scheduled, now, node)
        self.transport.write(self.g.request_for(node))

    def data_received(self, data):
        for status, body in self.parser.feed(data):
            if self.inflight is None:
                self.g.stats.error("unexpected response")
                continue
            scheduled, sent, node = self.inflight
            self.inflight = None
            self.g.record(scheduled, sent, time.time(), status, body)
            if self.queue:
                self._send(*self.queue.pop(0))

    def connection_lost(self, exc):
        self.transport = None
        self.g.stats.conn_errors += 1
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("lost"))


class HeartbeatGen:
    def __init__(self, args):
        self.a = args
        self.stats = Stats()
        self.win = (0.0, 0.0)
        self.sent_total = 0
        self.templates = {}

    def request_for(self, node):
        a = self.a
        nid = a.first + node
        if a.tls_dir:
            addr = f"tls://127.0.0.1:{10000 + nid % 50000}"
        else:
            addr = f"tcp://127.0.{1 + (nid >> 8) % 250}.{1 + nid % 250}:9003"
        body = (
            f'{{"jsonrpc":"2.0","method":"explorer.heartbeat","id":{nid},"params":'
            f'{{"node_id":"bench-{nid:06d}","socket_path":"{addr}",'
            f'"name":"bench-{nid:06d}","version":"0.1.0",'
            '"capacity":{"vcpus":16,"memory_mb":65536,"disk_gb":1000},'
            f'"usage":{{"vcpus":{nid % 16},"memory_mb":{(nid % 64) * 1024},"disk_gb":100}},'
            f'"vm_count":{nid % 8}}}}}'
        ).encode()
        self.sent_total += 1
        return http_request(body)

    def record(self, scheduled, sent, now, status, body):
        w0, w1 = self.win
        if not (w0 <= scheduled < w1):
            return
        if status != 200 or b'"accepted":true' not in body:
            self.stats.error(f"{status} {body[:200]!r}")
            return
        self.stats.ok += 1
        self.stats.hist.add(now - scheduled)
        self.stats.lateness.add(max(sent - scheduled, 1e-7))

    async def connect_all(self, conns=None, which=None):
        """Connect every connection (or those in ``which``, into ``conns``)."""
        a = self.a
        loop = asyncio.get_running_loop()
        srcs = a.src or ["127.0.0.1"]
        if conns is None:
            conns = [None] * a.conns
        sem = asyncio.Semaphore(a.connect_concurrency)
        deadline = time.monotonic() + a.connect_timeout

        if a.tls_dir and a.conns != a.nodes:
            raise SystemExit("over TLS every node needs its own connection and certificate")

        async def one(i):
            async with sem:
                kw = {}
                if a.tls_dir:
                    # node i of this generator: its own context and certificate
                    path = os.path.join(a.tls_dir, f"{a.first + i}.pem")
                    kw = {"ssl": client_context(a.tls_ca, path), "server_hostname": a.host}
                while True:
                    try:
                        _, p = await asyncio.wait_for(
                            loop.create_connection(
                                lambda: _HbConn(self),
                                a.host,
                                a.port,
                                local_addr=(srcs[i % len(srcs)], 0),
                                **kw,
                            ),
                            10,
                        )
                        conns[i] = p
                        return
                    except (TimeoutError, OSError) as e:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"connect {i}: {e}") from None
                        await asyncio.sleep(0.05)

        await asyncio.gather(
            *(one(i) for i in (range(a.conns) if which is None else which))
        )
        return conns

    async def run(self):
        a = self.a
        loop = asyncio.get_running_loop()
        t_connect = time.time()
        conns = await self.connect_all()
        connect_s = time.time() - t_connect
        print(json.dumps({"ready": True, "connect_s": connect_s}), flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        ctl = json.loads(line)
        # A connection that waited idle through a long connect phase (thousands of TLS
        # handshakes, other generators) may have met the server's idle timeout: open
        # it again, as a node would, before the first heartbeat.
        lost = [i for i, c in enumerate(conns) if c.transport is None]
        if lost:
            await self.connect_all(conns, lost)
        self.stats.conn_errors -= len(lost)
        t0, w0, w1, end = ctl["t0"], ctl["w0"], ctl["w1"], ctl["end"]
        self.win = (w0, w1)
        n = a.nodes
        interval = a.interval
        # Node i of this generator fires at t0 + phase(i) + k*interval, where the phase
        # spreads all nodes of all generators uniformly over one interval.
        wall0 = time.time()
        mono0 = loop.time()

        def at(wall):
            return mono0 + (wall - wall0)

        def fire(node, scheduled):
            if scheduled >= end:
                return
            conns[node % len(conns)].enqueue(scheduled, node)
            nxt = scheduled + interval
            loop.call_at(at(nxt), fire, node, nxt)

        for node in range(n):
            phase = ((a.first + node) % a.total_nodes) / a.total_nodes * interval
            s = t0 + phase
            loop.call_at(at(s), fire, node, s)
        await asyncio.sleep(max(0.0, w0 - time.time()))
        c0 = cpu_seconds()
        await asyncio.sleep(max(0.0, w1 - time.time()))
        c1 = cpu_seconds()
        await asyncio.sleep(max(0.0, end - time.time()) + 1.0)
        pending = sum(len(c.queue) + (c.inflight is not None) for c in conns)
        for c in conns:
            if c.transport is not None:
                c.transport.close()
        s = self.stats
        return {
            "ok": s.ok,
            "errors": s.errors,
            "conn_errors": s.conn_errors,
            "error_samples": s.error_samples,
            "duration": w1 - w0,
            "cpu_s": c1 - c0,
            "hist": s.hist.to_json(),
            "lateness": s.lateness.to_json(),
            "pending_at_end": pending,
            "connect_s": connect_s,
            "reconnected": len(lost),
            "sent_total": self.sent_total,
        }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=["closed", "heartbeat"])
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
    a = p.parse_args(argv)
    a.total_nodes = a.total_nodes or a.nodes
    nofile = raise_nofile()
    # The generator's own collector pauses (0.15-0.2 s with 9,000 connections open)
    # would be counted as the server's latency.  A run is bounded, and what it leaves
    # to the cycle collector is small.
    gc.disable()
    if a.mode == "closed":
        result = asyncio.run(ClosedLoop(a).run())
    else:
        result = asyncio.run(HeartbeatGen(a).run())
    result["nofile"] = nofile
    result["pid"] = os.getpid()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
