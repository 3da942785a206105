#!/usr/bin/env python3
"""
The placement index alone, in process (no sockets): 100,000 nodes in 4 zones, 250
steady heartbeats between placements (5,000/s against 20 placements a second), spread,
binpack and ``where`` in turn.  Wall time and the thread's CPU time per call: on a
shared machine the CPU time says what the code costs, the wall time what the scheduler
added.

    .venv/bin/python bench/place_index.py [N]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hero_compute.explorer.placement import PlacementIndex, Request  # noqa: E402
from hero_compute.explorer.records import NodeRecord  # noqa: E402


def percentiles(samples):
    """:return: ``p50 / p99 / p99.9`` of ``samples`` (seconds) in ms"""
    samples = sorted(samples)
    at = [samples[int(len(samples) * q)] * 1e3 for q in (0.5, 0.99, 0.999)]
    return " / ".join(f"{v:.2f}" for v in at)


def main(n=100_000, calls=1500, beats=250):
    index = PlacementIndex(30.0, 20.0)
    records = []
    for i in range(n):
        record = NodeRecord(
            node_id=f"bench-{i:06d}",
            name="n",
            socket_path="tcp://127.0.0.1:1",
            transport="tcp",
            version="",
            capacity={"vcpus": 16, "memory_mb": 65536, "disk_gb": 1000},
            usage={"vcpus": i % 16, "memory_mb": (i % 64) * 1024, "disk_gb": 100},
            vm_count=0,
            labels={"zone": "abcd"[i % 4]},
            first_seen=100.0,
            last_seen=100.0,
        )
        index.update(record)
        records.append(record)
    requests = [
        Request.of(1, 1024, 10),
        Request.of(1, 1024, 10, strategy="binpack"),
        Request.of(1, 1024, 10, where={"zone": "b"}),
    ]
    wall, cpu, k = [], [], 0
    for call in range(calls):
        for _ in range(beats):
            record = records[k % n]
            k += 1
            record.last_seen = 101.0
            index.update(record, [])
        t, c = time.perf_counter(), time.thread_time()
        index.place(requests[call % 3], 110.0)
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - t)
    print(f"explorer.place index, N={n:,}, {calls} calls (p50 / p99 / p99.9 ms)")
    print(f"  wall {percentiles(wall)}")
    print(f"  cpu  {percentiles(cpu)}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
