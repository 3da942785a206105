#!/usr/bin/env python3
"""
The explorer's periodic work at N nodes, in process (no sockets): the CPU time of each
reactor turn of the record writer's flush (every record changed, as when a fleet
registers, into the local SQLite store), of the liveness sweep (nothing offline, then
every node offline), of ``explorer.info``'s node counts, and of a steady heartbeat
through the registry.  CPU time (``time.thread_time``), so the numbers hold on a
shared machine.

    .venv/bin/python bench/periodic_turns.py [N]
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import task  # noqa: E402

from hero_compute.explorer.liveness import LivenessLog  # noqa: E402
from hero_compute.explorer.records import Heartbeat  # noqa: E402
from hero_compute.explorer.registry import Registry  # noqa: E402
from hero_compute.explorer.state import ExplorerState  # noqa: E402


def turns(clock, first=None):
    """
    Run ``first()`` (if given) and then, one at a time, every call due on ``clock``
    (a ``callLater(0)`` is the next reactor turn), timing each.

    :return: the CPU milliseconds of each turn
    """
    cpu = []
    if first is not None:
        c = time.thread_time()
        first()
        cpu.append((time.thread_time() - c) * 1e3)
    while clock.calls and clock.calls[0].getTime() <= clock.seconds():
        call = clock.calls.pop(0)
        call.called = 1
        c = time.thread_time()
        call.func(*call.args, **call.kw)
        cpu.append((time.thread_time() - c) * 1e3)
    return cpu


def counts(registry, now):
    """:return: the CPU ms of a scan of the registry and of the summary's counts"""
    c = time.thread_time()
    len(registry.offline(now))
    scan = time.thread_time() - c
    c = time.thread_time()
    registry.summary.answer(now)["nodes"]
    kept = time.thread_time() - c
    return (
        f"a scan of the registry {scan * 1e3:.2f} ms CPU, the summary's {kept * 1e3:.3f} ms"
    )


def show(what, cpu):
    print(
        f"{what}: {len(cpu)} turns, total {sum(cpu):.1f} ms CPU, "
        f"longest {max(cpu):.2f} ms, median {sorted(cpu)[len(cpu) // 2]:.2f} ms"
    )


def main(n=100_000):
    clock = task.Clock()
    clock.advance(1000.0)
    registry = Registry(offline_after=30.0, clock=clock)
    for i in range(n):
        registry.heartbeat(
            Heartbeat(
                node_id=f"bench-{i:06d}",
                socket_path=f"tcp://127.0.0.1:{10000 + i % 50000}",
                transport="tcp",
                name=f"bench-{i:06d}",
                version="0.1.0",
                capacity={"vcpus": 16, "memory_mb": 65536, "disk_gb": 1000},
                usage={"vcpus": i % 16, "memory_mb": 4096, "disk_gb": 100},
                vm_count=i % 4,
                labels={"zone": "abcd"[i % 4]},
            )
        )
    beats = registry.records()
    c = time.thread_time()
    for record in beats:
        registry.heartbeat(record)  # a steady full heartbeat: nothing changes
    hb = (time.thread_time() - c) / len(beats)
    print(f"steady heartbeats through the registry: {hb * 1e6:.2f} µs CPU each")
    with tempfile.TemporaryDirectory() as tmp:
        state = ExplorerState(
            clock=clock, reactor=None, db_path=os.path.join(tmp, "state.db")
        )
        state.open()
        writer = state.records
        for round_ in ("insert", "replace"):
            for record in registry.records():
                writer.save_node(record)
            clock.rightNow += 1.0  # the flush is due: turns() runs it
            show(f"flush of {n:,} changed records ({round_})", turns(clock))
        state.close({})
    print(f"node counts, all online: {counts(registry, clock.seconds())}")
    sweep = LivenessLog(registry, clock, 7.5)
    show(f"liveness sweep, {n:,} online", turns(clock, sweep.sweep))
    clock.advance(60.0)
    show(f"liveness sweep, {n:,} gone offline", turns(clock, sweep.sweep))
    show(f"liveness sweep, {n:,} offline (known)", turns(clock, sweep.sweep))
    print(f"node counts, all online: {counts(registry, clock.seconds())}")
    print(f"node counts, all offline: {counts(registry, clock.seconds())}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
