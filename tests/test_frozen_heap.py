"""
:class:`~hero_compute.rpc.heap.FrozenHeap` in this process: what survives start-up and
each full collection is frozen, a thaw finds the cycles frozen objects made, and the
explorer's side of a closed connection makes none (so freezing it cannot leak it).
"""

import gc
import json
import time
import weakref
from collections import Counter

import httptools
import pytest_twisted
from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from hero_compute.explorer.tree import make_explorer
from hero_compute.rpc.addresses import parse_listen
from hero_compute.rpc.dispatch import CallContext
from hero_compute.rpc.heap import FULL_EVERY, FrozenHeap
from hero_compute.rpc.http_server import RpcHTTPProtocol
from hero_compute.rpc.listen import Listen

from .support import until

#: Connections opened and closed by the cycle test.
CONNECTIONS = 200

#: What the explorer keeps per connection.
CONNECTION_TYPES = (tcp.Server, RpcHTTPProtocol, httptools.HttpRequestParser, CallContext)


#: Frozen objects that may die between two looks at the count.
SLACK = 100


def test_start_freezes_and_full_collections_freeze_again():
    """Start-up's objects are frozen; what a full collection leaves is frozen too."""
    thresholds = gc.get_threshold()
    heap = FrozenHeap(Clock())
    heap.startService()
    try:
        # A frozen object whose last reference goes (another thread's, a weak
        # cache's) leaves the permanent generation: the count may drop a little,
        # never grow, until the next full collection.
        assert heap.frozen > 0
        assert heap.frozen - SLACK <= gc.get_freeze_count() <= heap.frozen
        assert gc.get_threshold() == (*thresholds[:2], FULL_EVERY)
        kept = [[i] for i in range(1000)]  # lists: tracked by the collector
        gc.collect(1)
        assert heap.frozen - SLACK <= gc.get_freeze_count() <= heap.frozen
        gc.collect()
        assert gc.get_freeze_count() >= heap.frozen + len(kept)
    finally:
        heap.stopService()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == thresholds
    assert not heap.running


def test_a_full_collection_walks_only_what_came_since():
    """With a large heap frozen, a full collection takes a fraction of the time."""
    ballast = [{"n": [i]} for i in range(200_000)]
    started = time.perf_counter()
    gc.collect()
    whole = time.perf_counter() - started
    heap = FrozenHeap(Clock())
    heap.startService()
    try:
        started = time.perf_counter()
        gc.collect()
        assert time.perf_counter() - started < whole / 4
    finally:
        heap.stopService()
        del ballast


def test_thaw_collects_cycles_frozen_objects_made():
    """A garbage cycle among frozen objects is found by the next thaw, then refrozen."""
    clock = Clock()
    heap = FrozenHeap(clock, thaw_every=60.0)
    with capturedLogs() as events:
        heap.startService()
        try:
            cycle = [[]]
            cycle[0].append(cycle)
            gc.collect()  # survives: frozen
            ref = weakref.ref(_Node(cycle))
            gc.collect()
            del cycle
            gc.collect()
            assert ref() is not None  # frozen, so out of the collector's sight
            clock.advance(60.0)
            assert ref() is None
            assert gc.get_freeze_count() > 0
            assert clock.getDelayedCalls()  # the next thaw
        finally:
            heap.stopService()
    assert not clock.getDelayedCalls()
    (line,) = [formatEvent(e) for e in events if "whole heap" in e["log_format"]]
    assert "objects were unreachable" in line


class _Node:
    """A weakly referenceable object in a cycle."""

    def __init__(self, cycle):
        self.cycle = cycle
        cycle.append(self)


class _Heartbeat(protocol.Protocol):
    """Sends one ``explorer.info`` request and fires ``answered`` on its answer."""

    def __init__(self):
        self.answered = defer.Deferred()
        self.closed = defer.Deferred()
        self._received = b""

    def connectionMade(self):
        body = json.dumps({"jsonrpc": "2.0", "method": "explorer.info", "id": 1}).encode()
        self.transport.write(
            b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    def dataReceived(self, data):
        self._received += data
        if b'"result"' in self._received and not self.answered.called:
            self.answered.callback(None)

    def connectionLost(self, reason):
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_closed_incoming_connections_leave_no_cycles(short_tmp):
    """
    The explorer's side of a closed connection (transport, HTTP protocol, parser, call
    context) leaves no garbage cycle: reference counting frees it even when frozen.
    """
    explorer = make_explorer(
        reactor=reactor,
        clock=reactor,
        listen=[Listen.tcp(parse_listen("127.0.0.1:0"))],
        offline_after=30.0,
        state_dir=f"{short_tmp}/state",
    )
    explorer.privilegedStartService()
    explorer.startService()
    try:
        port = int(explorer.listeners.bound[0].rsplit(":", 1)[1])
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        gc.collect()  # earlier tests' garbage
        clients = [_Heartbeat() for _ in range(CONNECTIONS)]
        await defer.gatherResults([connectProtocol(endpoint, c) for c in clients])
        await defer.gatherResults([c.answered for c in clients])
        for c in clients:
            c.transport.loseConnection()
        await defer.gatherResults([c.closed for c in clients])
        del clients
        # The explorer's side sees the close a turn or more later.
        factory = explorer.listeners._factory
        await until(lambda: not factory._connections, what="the explorer's side to close")
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            # Our client's side (Twisted's connector and client) does make cycles.
            left = Counter(
                type(o).__name__ for o in gc.garbage if type(o) in CONNECTION_TYPES
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        assert left == Counter()
    finally:
        await explorer.stopService()
