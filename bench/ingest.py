"""
The heartbeat ingest section (N simulated nodes heartbeating one explorer, with a
client paging through ``explorer.query_nodes`` during the largest run's measured window)
and the py-spy profile section, which profiles the explorer under the floor load and
under ingest, then summarises the raw samples.  Each section is a function
``(procs, tmp, res, cfg)``.  The heartbeat generators' plumbing is shared with the
restart section.
"""

import json
import math
import os
import resource
import signal
import time

import loadcore
from loadrun import summarize, to_ms
from procs import (
    CLIENT_CPU,
    FLEET_ENV,
    HERE,
    PY,
    PYSPY,
    SERVER_CPU,
    proc_cpu,
    proc_rss,
    rpc,
    start_explorer,
)

#: Connections one heartbeat generator opens at most; more make more generators.
PER_GEN_CONNS = 9000
#: Heartbeats a second one generator is given at most: one asyncio loop spends some
#: 30-40 us on each, and a generator that falls behind is measured as the explorer's
#: latency (send_delay shows it).
PER_GEN_RATE = 4000


def fleet_conns(n, tls=False):
    """
    :return: ``(connections, RLIMIT_NOFILE)`` for ``n`` simulated nodes: one each while
        the explorer's descriptor limit allows, beyond it several nodes (each on its own
        schedule) share one
    """
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    # Plain TCP keeps round two's 60,000 connections at most (its rows stay comparable);
    # over TLS each node has its own certificate, hence its own connection.
    max_conns = max(100, nofile - 200 if tls else min(nofile - 200, 60000))
    conns = min(n, max_conns)
    if tls and conns < n:
        raise RuntimeError(f"TLS ingest needs {n} connections; RLIMIT_NOFILE is {nofile}")
    return conns, nofile


#: Seconds after the first interval that registering the whole fleet may take.
REGISTER_BOUND = 60.0
#: New nodes a second when a fleet first registers: a fleet of 100,000 is not born in
#: one interval, and the steady state is what ingest measures (the restart section is
#: where a fleet comes back at once).  A first heartbeat costs the explorer several
#: times a steady one; past what it sustains, answers take longer than a node waits
#: (10 s), the nodes reconnect, and the fleet never converges.
REGISTER_RATE = 2500.0


def register_ramp(n, interval):
    """
    :return: seconds over which ``n`` new nodes join (see :data:`REGISTER_RATE`), or 0
        when they may all join in their first interval
    """
    return n / REGISTER_RATE if n / REGISTER_RATE > interval else 0.0


def wait_registered(sock, n, deadline, every=1.0):
    """
    Poll ``explorer.info`` until ``n`` nodes are online or the Unix time ``deadline``.

    :return: the Unix time they all were, or None
    """
    while time.time() < deadline:
        t = time.time()
        try:
            if rpc(sock, "explorer.info", timeout=10)["nodes"]["online"] >= n:
                return time.time()
        except (OSError, RuntimeError):
            pass  # busy registering: ask again
        time.sleep(max(0.0, every - (time.time() - t)))
    return None


def start_generators(procs, port, n, conns, interval, tls=None, full=False, name="hb"):
    """
    Heartbeat generators (``loadgen.py heartbeat``) for ``n`` nodes over ``conns``
    connections, all pinned to the client CPUs; they connect, say they are ready, and
    wait for :func:`control`.

    :param full: full heartbeats only (an old node), never a delta
    :return: the generator processes
    """
    ngen = max(1, math.ceil(conns / PER_GEN_CONNS), math.ceil(n / interval / PER_GEN_RATE))
    gens = []
    first = 0
    for g in range(ngen):
        gconns = conns // ngen + (1 if g < conns % ngen else 0)
        gnodes = n // ngen + (1 if g < n % ngen else 0)
        srcs = []
        for k in range(2, 2 + max(1, math.ceil(gconns / 5000))):
            srcs += ["--src", f"127.0.{g + 1}.{k}"]
        cmd = [
            PY,
            os.path.join(HERE, "loadgen.py"),
            "heartbeat",
            "--port",
            str(port),
            "--nodes",
            str(gnodes),
            "--first",
            str(first),
            "--total-nodes",
            str(n),
            "--conns",
            str(gconns),
            "--interval",
            str(interval),
        ] + srcs
        if tls:
            cmd += ["--tls-ca", tls["ca"], "--tls-dir", tls["dir"]]
        if full:
            cmd.append("--full")
        first += gnodes
        gens.append(
            procs.start(
                cmd, f"loadgen-{name}{g}", cpus=CLIENT_CPU, stdin=True, stdout_pipe=True
            )
        )
    return gens


def wait_ready(gens):
    """:return: the longest time a generator took to open its connections, in s"""
    connect_s = 0.0
    for gp in gens:
        line = gp.stdout.readline()
        if not line:
            raise RuntimeError(
                f"heartbeat generator died: {open(gp.logpath).read()[-1500:]}"
            )
        connect_s = max(connect_s, json.loads(line)["connect_s"])
    return connect_s


def control(gens, line):
    """Send every generator one line: the schedule (a dict), or ``"stop"``."""
    data = (json.dumps(line) if isinstance(line, dict) else line) + "\n"
    for gp in gens:
        gp.stdin.write(data.encode())
        gp.stdin.flush()


def collect(procs, gens, timeout):
    """:return: every generator's JSON result, once each has exited"""
    outs = []
    for gp in gens:
        out, _ = gp.communicate(timeout=timeout)
        procs.procs.remove(gp)
        outs.append(json.loads(out.decode().strip().splitlines()[-1]))
    return outs


def gen_details(outs):
    """The generators' side of a row: which heartbeats they sent, and reconnections."""
    mode = outs[0]["mode"]
    if mode == "delta" and not any(o["sessions_seen"] for o in outs):
        mode = "delta (no session answered: all full)"
    return dict(
        hb_mode=mode,
        sent_full=sum(o["sent_full"] for o in outs),
        sent_delta=sum(o["sent_delta"] for o in outs),
        resent_full=sum(o["resent_full"] for o in outs),
        skipped=sum(o["skipped"] for o in outs),
        reconnected=sum(o.get("reconnected", 0) for o in outs),
        timeouts=sum(o["timeouts"] for o in outs),
    )


def start_pages(procs, sock, start, duration, rate, limit=1000, method=None, params=None):
    """
    A client paging through ``explorer.query_nodes`` (``loadgen.py pages``), or making
    one other call (``method`` with ``params``) again and again.
    """
    cmd = [
        PY,
        os.path.join(HERE, "loadgen.py"),
        "pages",
        "--unix",
        sock,
        "--limit",
        str(limit),
        "--rate",
        str(rate),
        "--count",
        str(int(rate * duration) + 1),
        "--start",
        str(start),
        "--duration",
        str(duration),
    ]
    if method:
        cmd += ["--method", method, "--params", json.dumps(params or {})]
    return procs.start(cmd, "loadgen-pages", cpus=CLIENT_CPU, stdout_pipe=True)


def sec_ingest(procs, tmp, res, cfg):
    top = max(cfg["ingest_n"])
    for n in cfg["ingest_n"]:
        _ingest_one(procs, tmp, res, cfg, n, pages=n == top)


def _ingest_one(
    procs,
    tmp,
    res,
    cfg,
    n,
    profile_out=None,
    tls=None,
    hostile=None,
    section="ingest",
    label="",
    targets=True,
    pages=False,
    caller=None,
    env_extra=None,
):
    """
    One ingest run of ``n`` simulated nodes; adds its row (and targets) and returns
    ``(summary, explorer cpu share, wrongly offline, conns, extra)``.

    :param tls: ``{"ca": ca.pem, "dir": <node index>.pem directory, "explorer_env":
        {...}}``: heartbeat over mutual TLS, one connection and certificate per node
    :param hostile: ``start(exp) -> finish() -> dict``, started once every generator
        is connected (before the first heartbeat), finished after the window; its
        dict goes into the row
    :param pages: also page through ``explorer.query_nodes`` over the Unix socket
        during the measured window (the ``query`` row)
    :param caller: ``(method, params, rate, row)`` instead of the pages: that call at
        that rate during the window, ``row(res, out, n)`` adding its row
    :param env_extra: more variables for the explorer (the store section's
        ``EXPLORER_DATABASE``)
    """
    conns, nofile = fleet_conns(n, tls)
    env = dict(FLEET_ENV, **(tls["explorer_env"] if tls else {}), **(env_extra or {}))
    exp = start_explorer(
        procs,
        tmp,
        f"{section}{n}{'-tls' if tls else ''}{'-hostile' if hostile else ''}-explorer",
        cpus=SERVER_CPU,
        nofile=nofile,
        env=env,
    )
    pid = exp.pid
    gens = []
    spy = None
    finish = None
    pager = None
    try:
        # warm the code paths before taking the idle RSS
        rpc(exp.sock, "explorer.info")
        time.sleep(0.3)
        rss_idle = proc_rss(pid)
        interval = cfg["hb_interval"]
        gens = start_generators(
            procs,
            exp.tls_port if tls else exp.port,
            n,
            conns,
            interval,
            tls=tls,
            full=cfg["hb_full"],
        )
        connect_s = wait_ready(gens)
        if hostile:
            finish = hostile(exp)
        t0 = time.time() + 0.5
        # The first round registers every node (at most REGISTER_RATE a second); the
        # window measures the steady state after it.  A registration the explorer
        # could not keep up with leaves a backlog: then the window starts one interval
        # after the last node registered.
        ramp = register_ramp(n, interval)
        control(
            gens,
            {"t0": t0, "ramp": ramp, "end": t0 + ramp + 2 * interval + REGISTER_BOUND + 60},
        )
        registered = wait_registered(exp.sock, n, t0 + ramp + interval + REGISTER_BOUND)
        if registered is None:
            w0 = time.time() + 1.0  # measure anyway: never_registered tells
        elif registered <= t0 + ramp + interval + 2.0:
            w0 = t0 + ramp + interval  # every node's first heartbeat was due before
        else:
            w0 = registered + interval
        w0 = max(w0, time.time() + 0.5)
        w1 = w0 + cfg["hb_window"]
        end = w1 + 1.5
        control(gens, {"w0": w0, "w1": w1, "end": end})
        if caller:
            method, params, rate, _ = caller
            pager = start_pages(
                procs, exp.sock, w0, cfg["hb_window"], rate, method=method, params=params
            )
        elif pages:
            pager = start_pages(procs, exp.sock, w0, cfg["hb_window"], cfg["query_rate"])
        time.sleep(max(0, w0 - time.time()))
        cpu0, tw0 = proc_cpu(pid), time.time()
        if profile_out:
            spy = procs.start(
                [
                    PYSPY,
                    "record",
                    "-p",
                    str(pid),
                    "-r",
                    "250",
                    "-f",
                    "raw",
                    "-o",
                    profile_out,
                    "-d",
                    str(int(cfg["hb_window"])),
                ],
                "py-spy",
                cpus=CLIENT_CPU,
            )
        time.sleep(max(0, w1 - time.time()))
        cpu1, tw1 = proc_cpu(pid), time.time()
        rss = proc_rss(pid)
        info = rpc(exp.sock, "explorer.info", timeout=30)
        hostile_out = finish() if finish else {}
        finish = None
        outs = collect(procs, gens, end - time.time() + 60)
        gens = []
        page_out = None
        if pager:
            page_out = collect(procs, [pager], 60)[0]
            pager = None
        if spy:
            spy.wait(30)
            procs.procs.remove(spy)
        s = summarize(outs)
        late = loadcore.merge_histograms(o["lateness"] for o in outs)
        cpu_share = (cpu1 - cpu0) / (tw1 - tw0)
        per_node = (rss - rss_idle) / n
        expected = n * cfg["hb_window"] / interval
        cpu_per_hb_us = cpu_share / s["rps"] * 1e6 if s["rps"] else None
        # explorer.list_nodes refuses more than 10,000 nodes: count, do not list
        offline = info["nodes"]["offline"]
        extra = dict(
            explorer_cpu=round(cpu_share, 3),
            cpu_per_hb_us=round(cpu_per_hb_us, 1) if cpu_per_hb_us else None,
            rss_mb=round(rss / 2**20, 1),
            bytes_per_node=round(per_node),
            online=info["nodes"]["online"],
            never_registered=n - info["nodes"]["online"] - offline,
            wrongly_offline=offline,
            gen_cpu=round(s["gen_cpu"], 3),
            gens=len(outs),
            send_delay_p99_ms=to_ms(loadcore.percentile(late, 0.99)),
            expected_hb=round(expected),
            ok=s["ok"],
            err=s["errors"] + s["conn_errors"],
            # scheduled in the window, neither answered nor failed when the run ended
            unanswered=max(0, round(expected) - s["ok"] - s["errors"]),
            pending_at_end=sum(o["pending_at_end"] for o in outs),
            oldest_inflight_s=max(o["oldest_inflight_s"] for o in outs),
            connect_s=round(connect_s, 1),
            register_s=None if registered is None else round(registered - t0, 1),
            ramp_s=round(ramp, 1),
            **gen_details(outs),
            nofile=nofile,
            **hostile_out,
        )
        row = res.add(
            section,
            f"N={n:,} nodes, {conns:,} conns, every {interval:g}s"
            + (" (under py-spy)" if profile_out else "")
            + label,
            s["rps"],
            s["p50_ms"],
            s["p99_ms"],
            **extra,
        )
        if s["error_samples"]:
            res.note(f"{section} N={n}{label}: error samples {s['error_samples']}")
        if s["gen_cpu"] > 0.7 * len(CLIENT_CPU or (0,)):
            res.note(
                f"WARNING: {section} N={n}{label}: the generators used "
                f"{s['gen_cpu']:.0%} of the client core(s): they may be the bottleneck "
                "(send_delay shows how late they sent)"
            )
        if targets and not profile_out:
            if n == max(cfg["ingest_n"]):
                rate = n / interval
                p99 = s["p99_ms"]
                res.goal(
                    "ingest",
                    f"{s['rps']:,.0f}/s ({s['ok']:,} of {round(expected):,} answered), "
                    f"p99 {p99} ms, {offline} wrongly offline, {per_node:,.0f} B RSS "
                    f"per node; explorer CPU {cpu_share:.0%} of a core, generators "
                    f"{s['gen_cpu']:.0%} ({extra['hb_mode']})",
                    # the window holds exactly n * window / interval scheduled
                    # heartbeats; 1% of slack for the ones on its edges
                    s["rps"] >= 0.99 * rate
                    and p99 is not None
                    and p99 < 20
                    and offline == 0
                    and extra["never_registered"] == 0
                    and per_node <= 2048,
                    row=row,
                    n=n,
                    rate=rate,
                    interval=interval,
                )
            else:
                res.target(
                    f"ingest N={n:,}: no node wrongly offline",
                    not offline,
                    f"{offline} offline, {info['nodes']['online']} online",
                )
        if page_out:
            (caller[3] if caller else _query_row)(res, page_out, n)
        return s, cpu_share, offline, conns, extra
    finally:
        if finish:
            finish()
        for gp in gens:
            procs.stop(gp, signal.SIGKILL)
        if pager:
            procs.stop(pager, signal.SIGKILL)
        if spy:
            procs.stop(spy)
        procs.stop(exp)


def _query_row(res, out, n):
    """The ``query`` row and goal: query_nodes pages while the ingest ran."""
    h = {int(k): v for k, v in out["hist"].items()}
    p50 = to_ms(loadcore.percentile(h, 0.5))
    p99 = to_ms(loadcore.percentile(h, 0.99))
    row = res.add(
        "query",
        f"explorer.query_nodes limit 1,000, unix, during ingest N={n:,}",
        out["ok"] / out["duration"] if out["duration"] else None,
        p50,
        p99,
        calls=out["ok"],
        max_ms=out["max_ms"],
        nodes_per_page=round(out["nodes"] / out["ok"]) if out["ok"] else None,
        kb_per_page=round(out["bytes"] / out["ok"] / 1024) if out["ok"] else None,
        wraps=out["wraps"],
        late=out["late"],
        err=out["errors"],
    )
    if out["error_samples"]:
        res.note(f"query: error samples {out['error_samples']}")
    res.goal(
        "query",
        f"p99 {p99} ms (p50 {p50}, max {out['max_ms']}) over {out['ok']} pages",
        out["ok"] > 0 and not out["errors"] and p99 is not None and p99 < 20,
        row=row,
        n=n,
    )
