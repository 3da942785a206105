#!/usr/bin/env python3
"""
hero_compute benchmarks: framework floor, native TCP vs socat, heartbeat ingest, proxy
overhead, failure detection, and (optionally) a py-spy profile of the explorer.

    python bench/run.py                 # everything but the profile, < 10 minutes
    python bench/run.py --quick         # ~1-2 minutes, smaller N and shorter runs
    python bench/run.py --sections floor,transport --quick
    python bench/run.py --sections profile --quick

Only loopback addresses and Unix sockets in a temporary directory are used; every
process started is killed on exit.  Results: one table on stdout, and
bench/results/<stamp>.json and .md (plus latest.json / latest.md).
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import ingest  # noqa: E402
import sections  # noqa: E402
from procs import CLIENT_CPU, SERVER_CPU, Procs, log  # noqa: E402
from report import Results, git_rev, machine, render  # noqa: E402

#: Every section, in the order ``--sections all`` runs them: name -> function
#: ``(procs, tmp, res, cfg)``.
SECTIONS = {
    "floor": sections.sec_floor,
    "transport": sections.sec_transport,
    "ingest": ingest.sec_ingest,
    "proxy": sections.sec_proxy,
    "failure": sections.sec_failure,
    "profile": ingest.sec_profile,
}
DEFAULT_SECTIONS = ["floor", "transport", "ingest", "proxy", "failure"]


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="~1-2 minute run")
    ap.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} "
        f"(default: all but profile; 'all' for everything)",
    )
    ap.add_argument("--no-wrk", action="store_true", help="skip the wrk runs")
    ap.add_argument("--ingest-n", help="comma-separated node counts for ingest")
    ap.add_argument("--conns", type=int, help="connections for floor/transport")
    args = ap.parse_args(argv)
    args.sections = (
        list(SECTIONS)
        if args.sections == "all"
        else [s.strip() for s in args.sections.split(",") if s.strip()]
    )
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {list(SECTIONS)}")
    q = args.quick
    cfg = {
        "conns": args.conns or 16,
        "reps": 1 if q else 2,
        "dur": 2.0 if q else 6.0,
        "warm": 0.7 if q else 1.5,
        "wrk": not args.no_wrk and shutil.which("wrk") is not None,
        "ingest_n": [int(x) for x in args.ingest_n.split(",")]
        if args.ingest_n
        else ([1000, 5000] if q else [1000, 10000, 50000]),
        "hb_interval": 10.0,
        "hb_window": 4.0 if q else 15.0,
        "proxy_dur": 2.0 if q else 4.0,
        "fail_reps": 1 if q else 3,
        "profile_n": 5000 if q else 50000,
    }
    mach = machine()
    res = Results()
    res.note(
        f"server processes pinned to CPU {sorted(SERVER_CPU) if SERVER_CPU else '-'}, "
        f"load generators to CPU {sorted(CLIENT_CPU) if CLIENT_CPU else '-'} "
        "(socat, proxy and failure runs unpinned)"
    )
    res.note(
        f"floor/transport: {cfg['conns']} concurrent connections, closed loop; "
        "(py) = bench/loadgen.py, (wrk) = wrk -t1 with a Lua POST script; "
        "gen_cpu = generator CPU share of one core"
    )
    res.note(
        f"ingest: RLIMIT_NOFILE raised to the hard limit {mach['nofile_hard']} in "
        "the explorer (preexec setrlimit) and generators; where N exceeds it, "
        "several simulated nodes share one connection, each on its own schedule; "
        "latency is from the scheduled send time; send_delay = scheduled -> written, i.e. "
        "generator lateness plus waiting behind a shared connection's request in flight"
    )
    tmp = tempfile.mkdtemp(prefix="hero-bench-")
    procs = Procs(tmp)
    t_start = time.monotonic()
    failed = []

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        for sec in args.sections:
            log(f"section {sec} ...")
            t = time.monotonic()
            try:
                SECTIONS[sec](procs, tmp, res, cfg)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a failed section must not lose the others
                failed.append(sec)
                res.note(f"section {sec} FAILED: {type(e).__name__}: {e}"[:800])
                log(f"section {sec} failed: {e!r}")
                procs.stop_all()
            log(f"section {sec} took {time.monotonic() - t:.0f}s")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    res.note(f"total wall time {time.monotonic() - t_start:.0f}s")
    end_rev = git_rev()
    if end_rev != mach["commit"]:
        res.note(
            f"WARNING: the code changed during the run ({mach['commit']} -> {end_rev}); "
            "sections may have measured different versions"
        )
    text, md = render(res, mach, args)
    print(text)
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = {
        "machine": mach,
        "quick": q,
        "sections": args.sections,
        "config": cfg,
        "rows": res.rows,
        "targets": res.targets,
        "notes": res.notes,
    }
    for name in (stamp, "latest"):
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(data, f, indent=1)
        with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
            f.write(md)
    log(f"results written to {out_dir}/{stamp}.json and .md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
