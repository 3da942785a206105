#!/usr/bin/env python3
"""
hero_compute benchmarks: framework floor, native TCP vs socat, heartbeat ingest (with
explorer.query_nodes paged alongside), an explorer restart under a connected fleet,
proxy overhead, failure detection, and (optionally) a py-spy profile of the explorer.
Issue 23's goals (round three) and issue #12's (round two, rerun) are checked beside
their rows and listed as README-ready tables.

    python bench/run.py                 # everything but the profile, ~13 minutes
    python bench/run.py --quick         # smaller N and shorter runs, ~5 minutes
    python bench/run.py --sections floor,transport --quick
    python bench/run.py --sections restart --quick
    python bench/run.py --sections profile --quick
    python bench/run.py --sections tls,hostile     # issues #9 and #10
    python bench/run.py --sections tls_ingest --tls-ingest-n 10000   # issue 23
    python bench/run.py --sections ingest --full   # old nodes: no delta heartbeats
    python bench/run.py --sections saturate        # issue 23: full heartbeats, capacity
    python bench/run.py --sections console         # issue #19: console echo
    python bench/run.py --sections store --quick   # issue 21: PostgreSQL vs SQLite
    python bench/run.py --sections boot --boot-rounds 2   # issue 19: boot to SSH

Only loopback addresses and Unix sockets in a temporary directory are used; every
process started is killed on exit.  Results: one table on stdout, and
bench/results/<stamp>.json and .md (plus latest.json / latest.md).
"""

import argparse
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# the tree under test, for the certificates of the tls section (hero_compute.pki)
sys.path.insert(1, os.path.dirname(HERE))

import bootbench  # noqa: E402
import console_echo  # noqa: E402
import fleet  # noqa: E402
import ingest  # noqa: E402
import placebench  # noqa: E402
import procs as procs_mod  # noqa: E402
import pyspy  # noqa: E402
import restart  # noqa: E402
import saturate  # noqa: E402
import sections  # noqa: E402
import store  # noqa: E402
from procs import CLIENT_CPU, SERVER_CPU, Procs, log  # noqa: E402
from report import Results, git_rev, machine, render  # noqa: E402

#: Every section, in the order ``--sections all`` runs them: name -> function
#: ``(procs, tmp, res, cfg)``.
SECTIONS = {
    "floor": sections.sec_floor,
    "transport": sections.sec_transport,
    "ingest": ingest.sec_ingest,
    "saturate": saturate.sec_saturate,
    "restart": restart.sec_restart,
    "proxy": sections.sec_proxy,
    "failure": sections.sec_failure,
    "tls": fleet.sec_tls,
    "tls_ingest": fleet.sec_tls_ingest,
    "hostile": fleet.sec_hostile,
    "place": placebench.sec_place,
    "profile": pyspy.sec_profile,
    "console": console_echo.sec_console,
    "store": store.sec_store,
    "boot": bootbench.sec_boot,
}
DEFAULT_SECTIONS = [
    "floor",
    "transport",
    "ingest",
    "saturate",
    "restart",
    "proxy",
    "failure",
    "tls",
    "tls_ingest",
    "hostile",
    "place",
    "console",
    "store",
    "boot",
]


def other_benchmarks():
    """Pids of other ``bench/run.py`` processes (e.g. from another worktree)."""
    pids = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"bench/run.py") for a in args[:3]):
            pids.add(int(pid))
    return pids


def raise_hard_nofile(want):
    """
    Raise the hard RLIMIT_NOFILE to ``want`` (capped by ``fs.nr_open``) for this run and
    the processes it starts: root may (CAP_SYS_RESOURCE); anyone else keeps theirs, and
    the section that needs more says so.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                want = min(want, int(f.read()))
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, want))
        except (OSError, ValueError) as e:
            log(f"RLIMIT_NOFILE hard limit stays {hard}: {e}")


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
    ap.add_argument(
        "--ingest-n",
        help="comma-separated node counts for ingest (the largest is checked against "
        "the goal and has explorer.query_nodes paged alongside)",
    )
    ap.add_argument("--restart-n", type=int, help="node count for restart")
    ap.add_argument("--place-n", type=int, help="node count for place (issue 20)")
    ap.add_argument("--tls-ingest-n", type=int, help="node count for tls_ingest (issue 23)")
    ap.add_argument(
        "--store-n", type=int, help="node count for store, PostgreSQL vs SQLite (issue 23)"
    )
    ap.add_argument(
        "--boot-rounds", type=int, help="boot-to-SSH rounds per path (issue 19)"
    )
    ap.add_argument(
        "--full",
        action="store_true",
        help="simulated nodes send full heartbeats only (old nodes), never deltas",
    )
    ap.add_argument("--conns", type=int, help="connections for floor/transport")
    ap.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (process logs)"
    )
    ap.add_argument(
        "--trace",
        metavar="DIR",
        help="log the explorers' reactor stalls > 2 ms (collections, reads, timers) "
        "into DIR (bench/stalls/sitecustomize.py); the place section sums its window up",
    )
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
        else ([1000, 10000] if q else [1000, 10000, 100000]),
        "hb_interval": 10.0,
        "hb_window": 4.0 if q else 15.0,
        "hb_full": args.full,
        "query_rate": 5.0,
        "restart_n": args.restart_n or (5000 if q else 50000),
        "restart_steady": 5.0 if q else 10.0,
        "restart_bound": 60.0,
        "proxy_dur": 2.0 if q else 4.0,
        "fail_reps": 1 if q else 3,
        "profile_n": 5000 if q else 50000,
        "tls_n": 2000 if q else 10000,
        "tls_ingest_n": args.tls_ingest_n or (10000 if q else 100000),
        "store_n": args.store_n or (1000 if q else 10000),
        "hostile_n": 2000 if q else 10000,
        "loris_conns": 32,
        "saturate_n": 20000 if q else 100_000,
        "place_n": args.place_n or (10000 if q else 100000),
        "boot_rounds": args.boot_rounds or (2 if q else 3),
    }
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
        procs_mod.ENV["BENCH_TRACE"] = os.path.abspath(args.trace)
        procs_mod.ENV["PYTHONPATH"] = (
            os.path.join(HERE, "stalls") + os.pathsep + procs_mod.ENV["PYTHONPATH"]
        )
    if cfg["tls_ingest_n"] > 60000 and "tls_ingest" in args.sections:
        raise_hard_nofile(cfg["tls_ingest_n"] + 20000)
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
        "generator lateness plus waiting behind a shared connection's request in flight; "
        "hb_mode: 'delta' = the simulated nodes send delta heartbeats once the explorer "
        "answers a session (SPEC-delta), 'full' = --full (old nodes); sent_full / "
        "sent_delta / resent_full count every heartbeat of the run, the first round's "
        "full ones included"
    )
    if "ingest" in args.sections:
        res.note(
            f"query: during the measured window of the largest ingest run, one client "
            f"on the explorer's Unix socket asks explorer.query_nodes for pages of "
            f"1,000, {cfg['query_rate']:g} a second on one keep-alive connection, "
            "following next_cursor and wrapping around; latency from the request's "
            "write to its answer's last byte"
        )
    if "restart" in args.sections:
        res.note(
            f"restart: {cfg['restart_n']:,} simulated nodes; once all are online and "
            "one more interval has passed, SIGTERM, wait for the exit, and a new "
            "explorer on the same Unix socket, TCP and metrics ports and state directory "
            "(as systemctl restart); online_s = from the new process's start until "
            "every node is online (polled every 0.25 s over the Unix socket, at most "
            f"{cfg['restart_bound']:g} s: explorer.query_nodes for the first offline "
            "node after those seen online, explorer.info to confirm, since info walks "
            "every record: info_ms_steady is one such call before the restart); "
            "the generators open a lost "
            "connection again when a node's next heartbeat is due, each node keeping "
            "its schedule; reactor pauses from the explorer's hero_reactor_lag_seconds "
            "histogram, scraped at the new explorer's start, when all are online, and "
            f"{cfg['restart_steady']:g} s later"
        )
    res.note(
        "fleet sections (ingest, restart, tls, hostile, profile): the explorer runs with "
        "EXPLORER_NEW_NODES_PER_ADDR and HERO_MAX_CONNS_PER_ADDR raised to 1,000,000, "
        "since the simulated fleet comes from a few loopback addresses; other limits "
        "at their defaults; every explorer has its own EXPLORER_STATE_DIR"
    )
    if "tls" in args.sections:
        res.note(
            f"tls: {cfg['tls_n']:,} node certificates issued per run; the TLS and plain "
            "TCP ingest rows are fresh explorers in the same run, ratio = explorer CPU "
            "per heartbeat (cpu_per_hb_us); per_explorer_core_s = calls/s over the "
            "explorer's CPU share, what one explorer core would sustain"
        )
    if "hostile" in args.sections:
        res.note(
            "hostile: one peer pipelines rpc.discover on one connection from "
            "the start of the measured window and never reads; another keeps "
            f"{cfg['loris_conns']} connections sending one byte of a never-ending "
            "request head every 3 s (reconnecting when closed); HERO_HEAD_TIMEOUT and "
            "HERO_MAX_UNSENT at their defaults; both from their own loopback address"
        )
    others_before = other_benchmarks()
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
        if args.keep:
            log(f"process logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res.note(f"total wall time {time.monotonic() - t_start:.0f}s")
    others = others_before | other_benchmarks()
    if others:
        res.note(
            f"WARNING: {len(others)} other benchmark run(s) were running on this machine "
            "at the start or the end (pids " + ", ".join(map(str, sorted(others))) + "): "
            "they share the cores, numbers are noisier than usual"
        )
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
        "goals": res.goals,
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
