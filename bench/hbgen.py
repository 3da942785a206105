"""
``bench/loadgen.py heartbeat``: simulated nodes heartbeating on a fixed, phase-spread
schedule over persistent connections, with delta heartbeats (see ``bench/loadgen.py``'s
docstring for the mode).
"""

import asyncio
import collections
import json
import os
import re
import sys
import time

from loadcore import Parser, Stats, client_context, cpu_seconds, http_request

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
        self.parser = Parser()
        self.queue = collections.deque()  # (scheduled, node)
        self.inflight = None  # (scheduled, sent_at, node, was_delta)
        self.transport = None
        self.connecting = False

    def connection_made(self, transport):
        self.transport = transport
        self.parser = Parser()

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
