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
import collections
import gc
import json
import math
import os
import re
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
        # one sample of each kind of error (a flood of one kind hides the others)
        if len(self.error_samples) < 5 and not any(
            x[:24] == what[:24] for x in self.error_samples
        ):
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

#: The session in an ``explorer.heartbeat`` answer (SPEC-delta: opaque, a JSON string).
_SESSION = re.compile(rb'"session"\s*:\s*"((?:[^"\\]|\\.)*)"')


class _HbConn(asyncio.Protocol):
    """
    A persistent connection carrying the heartbeats of one or more nodes.  Once lost it
    is opened again when the next heartbeat is due on it, as a node's client would: a
    heartbeat in flight when it broke, or due while it cannot be opened, is failed and
    its node waits for its next tick (each node keeps its own schedule).
    """

    def __init__(self, gen, index):
        self.g = gen
        self.index = index
        self.parser = _Parser()
        self.queue = collections.deque()  # (scheduled, node)
        self.inflight = None  # (scheduled, sent_at, node, was_delta)
        self.transport = None
        self.connecting = False

    def connection_made(self, transport):
        self.transport = transport
        self.parser = _Parser()

    def enqueue(self, scheduled, node):
        g = self.g
        if g.busy[node]:
            # a node's ticks never overlap: while its last heartbeat is unanswered it
            # sends no other (and the explorer's backlog stays bounded by N)
            g.skipped += 1
            g.failed(scheduled, "skipped: the previous heartbeat is unanswered")
            return
        g.busy[node] = 1
        if self.inflight is None and self.transport is not None:
            self._send(scheduled, node)
            return
        self.queue.append((scheduled, node))
        if self.transport is None and not self.connecting:
            g.reopen(self)

    def flush(self):
        if self.inflight is None and self.queue and self.transport is not None:
            self._send(*self.queue.popleft())

    def _send(self, scheduled, node, full=False):
        g = self.g
        delta = not full and g.session[node] is not None
        if delta:
            g.sent_delta += 1
            req = g.delta_req[node]
        else:
            g.sent_full += 1
            req = g.full_req[node]
        self.inflight = (scheduled, time.time(), node, delta)
        self.transport.write(req)

    def data_received(self, data):
        g = self.g
        for status, body in self.parser.feed(data):
            if self.inflight is None:
                g.stats.error("unexpected response")
                continue
            scheduled, sent, node, delta = self.inflight
            self.inflight = None
            if status == 200 and b'"accepted":true' in body:
                if g.sessions:
                    g.accepted(node, body)
                g.record(scheduled, sent, time.time())
            elif delta:
                # SPEC-delta: a delta answered with an error is resent in full, at once,
                # once; its latency still counts from the scheduled time
                g.session[node] = None
                g.resent_full += 1
                self._send(scheduled, node, full=True)
                continue
            else:
                g.failed(scheduled, f"{status} {body[:200]!r}")
            g.busy[node] = 0
        self.flush()

    def connection_lost(self, exc):
        self.transport = None
        self.g.lost(self, exc)


class HeartbeatGen:
    def __init__(self, args):
        self.a = args
        self.stats = Stats()
        self.win = (0.0, 0.0)
        self.end = float("inf")
        self.running = False
        self.conns = []
        self.sessions = not args.full
        n = args.nodes
        # Prebuilt requests: the generator must cost far less per heartbeat than the
        # explorer it measures.
        self.full_req = [http_request(self.full_body(i)) for i in range(n)]
        self.busy = bytearray(n)  # 1 while a node's heartbeat is queued or in flight
        self.skipped = 0
        self.session = [None] * n  # bytes of the session a delta may use, or None
        self.delta_req = [None] * n
        self.delta_for = [None] * n  # the session delta_req[i] was built for
        self.sent_full = 0
        self.sent_delta = 0
        self.resent_full = 0
        self.sessions_seen = set()
        self.lost_inflight = 0
        self.connect_failed = 0
        self.reconnected = 0
        self.timeouts = 0
        # as a node (node/heartbeat.py): an attempt is bounded by the interval, and by
        # 10 s however long the interval
        self.timeout = args.timeout or min(args.interval, 10.0)

    def address(self, nid):
        if self.a.tls_dir:
            return f"tls://127.0.0.1:{10000 + nid % 50000}"
        return f"tcp://127.0.{1 + (nid >> 8) % 250}.{1 + nid % 250}:9003"

    def full_body(self, node):
        nid = self.a.first + node
        return (
            f'{{"jsonrpc":"2.0","method":"explorer.heartbeat","id":{nid},"params":'
            f'{{"node_id":"bench-{nid:06d}","socket_path":"{self.address(nid)}",'
            f'"name":"bench-{nid:06d}","version":"0.1.0",'
            '"capacity":{"vcpus":16,"memory_mb":65536,"disk_gb":1000},'
            f'"usage":{{"vcpus":{nid % 16},"memory_mb":{(nid % 64) * 1024},"disk_gb":100}},'
            f'"vm_count":{nid % 8}}}}}'
        ).encode()

    def delta_body(self, node, session):
        """Nothing of a simulated node changes: a delta is its id, address and session."""
        nid = self.a.first + node
        return (
            (
                f'{{"jsonrpc":"2.0","method":"explorer.heartbeat","id":{nid},"params":'
                f'{{"node_id":"bench-{nid:06d}","socket_path":"{self.address(nid)}",'
                f'"session":"'
            ).encode()
            + session
            + b'"}}'
        )

    def accepted(self, node, body):
        m = _SESSION.search(body)
        if m is None:  # an explorer without deltas: stay on full heartbeats
            self.session[node] = None
            return
        s = m.group(1)
        self.session[node] = s
        if self.delta_for[node] != s:
            self.sessions_seen.add(s)
            self.delta_req[node] = http_request(self.delta_body(node, s))
            self.delta_for[node] = s

    def record(self, scheduled, sent, now):
        w0, w1 = self.win
        if not (w0 <= scheduled < w1):
            return
        self.stats.ok += 1
        self.stats.hist.add(now - scheduled)
        self.stats.lateness.add(max(sent - scheduled, 1e-7))

    def failed(self, scheduled, what):
        w0, w1 = self.win
        if w0 <= scheduled < w1:
            self.stats.error(what)

    def lost(self, conn, exc):
        self.stats.conn_errors += 1
        # SPEC-delta: a transport failure forgets the session of every node on it
        for node in range(conn.index, self.a.nodes, len(self.conns) or 1):
            self.session[node] = None
        if conn.inflight is not None:
            self.lost_inflight += 1
            self.failed(conn.inflight[0], f"connection lost: {exc}")
            self.busy[conn.inflight[2]] = 0
            conn.inflight = None
        if conn.queue and self.running:
            self.reopen(conn)

    def sweep(self):
        """
        Give up on answers older than the timeout, dropping their connection as a
        node's client would (a connection the explorer never accepted, its listen
        queue full, looks established here and is never answered).
        """
        if not self.running:
            return
        now = time.time()
        for c in self.conns:
            f = c.inflight
            if f is not None and now - f[1] > self.timeout and c.transport is not None:
                self.timeouts += 1
                self.failed(f[0], f"timeout after {self.timeout:g} s")
                self.busy[f[2]] = 0
                c.inflight = None
                c.transport.abort()
        asyncio.get_running_loop().call_later(1.0, self.sweep)

    def reopen(self, conn):
        """Open a lost connection again; what waits on it is sent once it is open."""
        if not self.running:
            return
        conn.connecting = True
        asyncio.get_running_loop().create_task(self._reopen(conn))

    async def _reopen(self, conn):
        try:
            await asyncio.wait_for(self._connect(conn), 5)
            self.reconnected += 1
        except (TimeoutError, OSError) as e:
            self.connect_failed += 1
            while conn.queue:
                scheduled, node = conn.queue.popleft()
                self.failed(scheduled, f"connect: {e}")
                self.busy[node] = 0
        finally:
            conn.connecting = False
        conn.flush()

    async def _connect(self, conn):
        a = self.a
        srcs = a.src or ["127.0.0.1"]
        kw = {}
        if a.tls_dir:
            # node i of this generator: its own context and certificate
            path = os.path.join(a.tls_dir, f"{a.first + conn.index}.pem")
            kw = {"ssl": client_context(a.tls_ca, path), "server_hostname": a.host}
        await asyncio.get_running_loop().create_connection(
            lambda: conn,
            a.host,
            a.port,
            local_addr=(srcs[conn.index % len(srcs)], 0),
            **kw,
        )

    async def connect_all(self, which):
        """Connect the connections in ``which`` (retrying until --connect-timeout)."""
        a = self.a
        sem = asyncio.Semaphore(a.connect_concurrency)
        deadline = time.monotonic() + a.connect_timeout

        async def one(i):
            async with sem:
                while True:
                    try:
                        await asyncio.wait_for(self._connect(self.conns[i]), 10)
                        return
                    except (TimeoutError, OSError) as e:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"connect {i}: {e}") from None
                        await asyncio.sleep(0.05)

        await asyncio.gather(*(one(i) for i in which))

    async def run(self):
        a = self.a
        if a.tls_dir and a.conns != a.nodes:
            raise SystemExit("over TLS every node needs its own connection and certificate")
        loop = asyncio.get_running_loop()
        self.conns = [_HbConn(self, i) for i in range(a.conns)]
        t_connect = time.time()
        await self.connect_all(range(a.conns))
        connect_s = time.time() - t_connect
        print(json.dumps({"ready": True, "connect_s": connect_s}), flush=True)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
        )
        ctl = json.loads(await reader.readline())
        # A connection that waited idle through a long connect phase (thousands of TLS
        # handshakes, other generators) may have met the server's idle timeout: open
        # it again, as a node would, before the first heartbeat.
        lost = [c.index for c in self.conns if c.transport is None]
        if lost:
            await self.connect_all(lost)
        self.stats.conn_errors -= len(lost)
        t0 = ctl["t0"]
        self.end = ctl["end"]
        ramp = ctl.get("ramp", 0.0)
        # With a ramp, node i joins at a time of its own in [t0, t0 + ramp) (spread
        # independently of its phase, so that joins come at an even rate) and sends
        # from its first scheduled heartbeat after that.
        joins = (
            [t0 + ((a.first + i) * 0.6180339887498949) % 1.0 * ramp for i in range(a.nodes)]
            if ramp
            else None
        )
        self.running = True
        stop = asyncio.Event()
        window = asyncio.Event()

        def set_window(msg):
            self.win = (msg["w0"], msg["w1"])
            self.end = msg.get("end", self.end)
            window.set()

        if "w0" in ctl:
            set_window(ctl)

        async def watch():
            # Later lines: the measured window {"w0", "w1", "end"} once the section
            # knows it (e.g. once every node is registered), or "stop" to end early.
            while True:
                line = await reader.readline()
                if not line:
                    return
                if line.strip() == b"stop":
                    self.end = min(self.end, time.time())
                    stop.set()
                    window.set()
                    return
                set_window(json.loads(line))

        watcher = loop.create_task(watch())
        loop.call_later(1.0, self.sweep)
        n, nconn = a.nodes, len(self.conns)
        step = a.interval / n
        # The k-th heartbeat of this generator is node k % n's, due at
        # t0 + (k + off) * step: every node every interval, the generator's nodes spread
        # evenly over it, and the generators interleaved by ``off`` (one timer pending,
        # not one per node).
        off = (a.first % a.total_nodes) / a.total_nodes
        wall0 = time.time()
        mono0 = loop.time()
        k = 0

        def tick():
            nonlocal k
            now = time.time()
            while True:
                due = t0 + (k + off) * step
                if due > now:
                    break
                if due >= self.end:
                    return
                node = k % n
                k += 1
                if joins and due < joins[node]:
                    continue
                self.conns[node % nconn].enqueue(due, node)
            loop.call_at(mono0 + (due - wall0), tick)

        loop.call_at(mono0 + (t0 - wall0), tick)

        async def until(t, event=stop):
            try:
                await asyncio.wait_for(event.wait(), max(0.0, t - time.time()))
            except TimeoutError:
                pass

        await until(self.end, window)
        if not window.is_set():
            self.win = (self.end, self.end)
        w0, w1 = self.win
        await until(w0)
        c0 = cpu_seconds()
        await until(w1)
        c1, t1 = cpu_seconds(), min(time.time(), w1)
        self.win = (w0, t1)
        await until(self.end)
        self.end = min(self.end, time.time())
        # the answers to what was sent before the end
        grace = time.monotonic() + 3.0
        while time.monotonic() < grace:
            pending = sum(len(c.queue) + (c.inflight is not None) for c in self.conns)
            if not pending:
                break
            await asyncio.sleep(0.05)
        self.running = False
        now = time.time()
        oldest = max((now - c.inflight[1] for c in self.conns if c.inflight), default=0.0)
        watcher.cancel()
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()
        s = self.stats
        return {
            "ok": s.ok,
            "errors": s.errors,
            "conn_errors": s.conn_errors,
            "error_samples": s.error_samples,
            "duration": max(t1 - w0, 1e-9),
            "cpu_s": c1 - c0,
            "hist": s.hist.to_json(),
            "lateness": s.lateness.to_json(),
            "pending_at_end": pending,
            "oldest_inflight_s": round(oldest, 1),
            "connect_s": connect_s,
            "reconnected": len(lost) + self.reconnected,
            "connect_failed": self.connect_failed,
            "lost_inflight": self.lost_inflight,
            "timeouts": self.timeouts,
            "sent_total": self.sent_full + self.sent_delta,
            "mode": "full" if a.full else "delta",
            "sent_full": self.sent_full,
            "sent_delta": self.sent_delta,
            "resent_full": self.resent_full,
            "skipped": self.skipped,
            "sessions_seen": len(self.sessions_seen),
        }


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
