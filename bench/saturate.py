"""
The ``saturate`` section (issue 23): the explorer's heartbeat capacity on one core with
full (non-delta) heartbeats from N distinct node ids.  A closed loop (each connection
sends its next heartbeat as soon as the last is answered) offers more than the explorer
answers, so heartbeats answered a second are its capacity; an open-loop schedule above
capacity would measure the collapse instead (nodes time out, reconnect and resend).
A function ``(procs, tmp, res, cfg)``.
"""

import json
import os

from loadrun import run_closed
from procs import CLIENT_CPU, FLEET_ENV, HERE, PY, SERVER_CPU, start_explorer

#: Connections of the closed loop: enough requests in flight to keep one core busy.
CONNS = 64
#: Issue 23's goal: answered heartbeats a second.
GOAL = 15_000.0
#: Seconds the first round (every id once: registrations) may take at most.
PRIME_BOUND = 120.0


def sec_saturate(procs, tmp, res, cfg):
    """Full heartbeats of ``saturate_n`` ids, round-robin, as fast as answered."""
    n = cfg["saturate_n"]
    exp = start_explorer(
        procs, tmp, f"saturate{n}-explorer", cpus=SERVER_CPU, env=FLEET_ENV
    )
    try:
        # Every id registers first: the measure is the steady state of known nodes.
        prime = procs.start(
            [PY, os.path.join(HERE, "loadgen.py"), "closed", "--port", str(exp.port)]
            + ["--conns", str(CONNS), "--heartbeats", str(n), "--prime"]
            + ["--duration", str(PRIME_BOUND), "--expect", '"accepted"'],
            "loadgen-prime",
            cpus=CLIENT_CPU,
            stdout_pipe=True,
        )
        out, _ = prime.communicate(timeout=PRIME_BOUND + 60)
        procs.procs.remove(prime)
        primed = json.loads(out.decode().strip().splitlines()[-1])
        if primed["errors"]:
            res.note(
                f"saturate: {primed['errors']} first heartbeats refused: "
                f"{primed['error_samples']}"
            )
        r = run_closed(
            procs,
            exp.port,
            CONNS,
            cfg["dur"] * 2,
            cfg["warm"],
            expect='"accepted"',
            server_pid=exp.pid,
            extra_args=["--heartbeats", str(n)],
        )
    finally:
        procs.stop(exp)
    cpu = r["srv_cpu"]
    per_core = r["rps"] / cpu if cpu else None
    row = res.add(
        "saturate",
        f"full heartbeats, N={n:,} ids, {CONNS} conns closed loop, tcp",
        r["rps"],
        r["p50_ms"],
        r["p99_ms"],
        explorer_cpu=cpu,
        per_explorer_core_s=round(per_core) if per_core else None,
        cpu_per_hb_us=round(cpu / r["rps"] * 1e6, 1) if cpu and r["rps"] else None,
        err=r["errors"] + r["conn_errors"],
        register_s=primed["seconds"],
        registered=primed["ok"],
        gen_cpu=round(r["gen_cpu"], 3),
    )
    res.goal(
        "ingest_full",
        f"{r['rps']:,.0f}/s answered (p99 {r['p99_ms']} ms), explorer CPU "
        f"{cpu if cpu is None else f'{cpu:.0%}'} of a core; the first round "
        f"registered {primed['ok']:,} of {n:,} in {primed['seconds']} s",
        r["rps"] >= GOAL and primed["primed"] and not r["errors"],
        row=row,
        n=n,
    )
    res.note(
        f"saturate: {n:,} node ids registered by one full heartbeat each, then full "
        f"heartbeats (--full's body) round-robin over them from {CONNS} keep-alive TCP "
        "connections in a closed loop (bench/loadgen.py closed --heartbeats), the "
        "explorer pinned to one core: answered/s is its capacity when explorer_cpu is "
        "near 1.0 (on a shared machine, less: per_explorer_core_s scales it)"
    )
