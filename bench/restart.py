"""
The restart section (issue #12), a function ``(procs, tmp, res, cfg)``: N simulated
nodes heartbeat an explorer until all are online and one more interval has passed;
then the explorer is restarted as ``systemctl restart`` would (SIGTERM, wait for the
exit, a new process on the same Unix socket, TCP and metrics ports and state
directory).  Measured: how long until every node is online again, and the reactor's
pauses while they re-register and in the steady state after, from the explorer's own
``hero_reactor_lag_seconds`` histogram.
"""

import http.client
import signal
import time

from ingest import (
    REGISTER_BOUND,
    collect,
    control,
    fleet_conns,
    gen_details,
    register_ramp,
    start_generators,
    wait_ready,
)
from loadrun import summarize
from procs import FLEET_ENV, SERVER_CPU, proc_cpu, rpc, start_explorer
from prometheus_client.parser import text_string_to_metric_families

#: The explorer's reactor lag histogram: each observation is how late a timer ran.
LAG = "hero_reactor_lag_seconds"


def scrape_lag(port):
    """
    One scrape of the explorer's ``/metrics``.

    :return: ``{"buckets": {le: cumulative count}, "count": n, "scrape_ms": ms}``;
        ``buckets`` is None when the explorer does not export :data:`LAG`
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        t = time.perf_counter()
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        took = time.perf_counter() - t
    finally:
        conn.close()
    out = {"buckets": None, "count": None, "scrape_ms": round(took * 1000, 1)}
    for family in text_string_to_metric_families(text):
        if family.name != LAG:
            continue
        out["buckets"] = {
            float(s.labels["le"]): s.value
            for s in family.samples
            if s.name.endswith("_bucket")
        }
        out["count"] = next(s.value for s in family.samples if s.name.endswith("_count"))
    return out


def pauses_above(a, b, threshold):
    """
    Observations above ``threshold`` seconds between two scrapes.

    An explorer without a bucket at ``threshold`` is counted above the largest bucket
    below it (more pauses, never fewer).

    :return: ``(count, bucket used, largest bucket reached)``, or ``(None, None, None)``
        without the histogram
    """
    if a["buckets"] is None or b["buckets"] is None:
        return None, None, None
    bounds = sorted(le for le in b["buckets"] if le <= threshold)
    if not bounds:
        return None, None, None
    le = bounds[-1]
    total = b["count"] - a["count"]
    above = total - (b["buckets"][le] - a["buckets"].get(le, 0))
    # the smallest bucket holding every observation of the interval: the longest pause
    reached = next(
        (
            x
            for x in sorted(b["buckets"])
            if b["buckets"][x] - a["buckets"].get(x, 0) >= total
        ),
        None,
    )
    return int(above), le, reached


def _poll_online(sock, n, deadline, every):
    """
    Poll until ``n`` nodes are online or ``deadline`` (monotonic).

    ``explorer.info`` counts by walking every record (tens of ms at 50,000 nodes, on
    the reactor being measured), so each poll asks ``explorer.query_nodes`` for the
    first offline node after those already seen online, which stops at it; once none
    is left, one ``explorer.info`` confirms that all ``n`` are there.

    :return: ``(monotonic time all were online or None, online count, longest poll
        in ms)``
    """
    cursor = waiting = None  # every node up to ``cursor`` is online
    slowest = 0.0
    while time.monotonic() < deadline:
        t = time.monotonic()
        try:
            params = {"status": "offline", "limit": 1}
            if cursor is not None:
                params["cursor"] = cursor
            page = rpc(sock, "explorer.query_nodes", params, timeout=10)
            if page["nodes"]:
                first = page["nodes"][0]["node_id"]
                if waiting is not None and first > waiting:
                    cursor = waiting
                waiting = first
            else:
                online = rpc(sock, "explorer.info", timeout=10)["nodes"]["online"]
                if online >= n:
                    slowest = max(slowest, time.monotonic() - t)
                    return time.monotonic(), online, round(slowest * 1000, 1)
                cursor = waiting = None  # some not registered at all yet: start over
        except (OSError, RuntimeError):
            pass  # a busy or starting explorer: ask again
        slowest = max(slowest, time.monotonic() - t)
        time.sleep(max(0.0, every - (time.monotonic() - t)))
    try:
        online = rpc(sock, "explorer.info", timeout=30)["nodes"]["online"]
    except (OSError, RuntimeError):
        online = None
    return None, online, round(slowest * 1000, 1)


def sec_restart(procs, tmp, res, cfg):
    n = cfg["restart_n"]
    interval = cfg["hb_interval"]
    bound = cfg["restart_bound"]
    conns, nofile = fleet_conns(n)
    name = f"restart{n}-explorer"
    exp = start_explorer(
        procs,
        tmp,
        name,
        cpus=SERVER_CPU,
        nofile=nofile,
        env=dict(FLEET_ENV, EXPLORER_METRICS_ADDR="127.0.0.1:0"),
    )
    gens = []
    try:
        gens = start_generators(
            procs, exp.port, n, conns, interval, full=cfg["hb_full"], name="rs"
        )
        connect_s = wait_ready(gens)
        t0 = time.time() + 0.5
        # The schedule outlasts the worst case; "stop" ends it once measured.
        end = t0 + n / 1000 + 3 * interval + REGISTER_BOUND + 60 + bound
        end += cfg["restart_steady"]
        ramp = register_ramp(n, interval)
        control(gens, {"t0": t0, "ramp": ramp, "w0": t0 + interval, "w1": end, "end": end})
        first, online, _ = _poll_online(
            exp.sock, n, time.monotonic() + 0.5 + ramp + interval + REGISTER_BOUND, 0.5
        )
        online_before = online
        if first is None:
            # measured anyway: the row says how many were online before
            res.note(f"restart: before the restart only {online:,} of {n:,} came online")
        time.sleep(interval)  # one steady interval: every node on its delta, if any
        t = time.monotonic()
        rpc(exp.sock, "explorer.info", timeout=30)
        info_ms = round((time.monotonic() - t) * 1000, 1)  # what one call costs

        # systemctl restart: SIGTERM, wait for the exit, start again, same everything
        t_term = time.monotonic()
        procs.stop(exp, timeout=60)
        down_s = time.monotonic() - t_term
        t_spawn = time.monotonic()
        exp = start_explorer(
            procs,
            tmp,
            name,
            cpus=SERVER_CPU,
            nofile=nofile,
            env=dict(FLEET_ENV, EXPLORER_METRICS_ADDR=f"127.0.0.1:{exp.metrics_port}"),
            tcp=f"127.0.0.1:{exp.port}",
        )
        listen_s = time.monotonic() - t_spawn
        s0 = scrape_lag(exp.metrics_port)
        cpu0, tc0 = proc_cpu(exp.pid), time.monotonic()
        all_at, online, poll_ms = _poll_online(exp.sock, n, t_spawn + bound, 0.25)
        cpu_rereg = (proc_cpu(exp.pid) - cpu0) / (time.monotonic() - tc0)
        online_s = None if all_at is None else all_at - t_spawn
        s1 = scrape_lag(exp.metrics_port)
        time.sleep(cfg["restart_steady"])
        s2 = scrape_lag(exp.metrics_port)
        control(gens, "stop")
        outs = collect(procs, gens, 60)
        gens = []

        rereg, le_r, max_r = pauses_above(s0, s1, 0.2)
        steady, le_s, max_s = pauses_above(s1, s2, 0.05)
        s = summarize(outs)
        limit = interval + 5
        row = res.add(
            "restart",
            f"N={n:,} nodes, {conns:,} conns, every {interval:g}s: restart -> all online",
            None,
            None,
            None,
            online_s=None if online_s is None else round(online_s, 2),
            online_before=online_before,
            online_at_end=online,
            down_s=round(down_s, 2),
            listen_s=round(listen_s, 2),
            pauses_gt_200ms_rereg=rereg,
            pauses_gt_50ms_steady=steady,
            longest_pause_le_rereg=max_r,
            longest_pause_le_steady=max_s,
            lag_obs_rereg=None if s0["count"] is None else int(s1["count"] - s0["count"]),
            lag_obs_steady=None if s1["count"] is None else int(s2["count"] - s1["count"]),
            scrape_ms_max=max(x["scrape_ms"] for x in (s0, s1, s2)),
            poll_ms_max=poll_ms,
            info_ms_steady=info_ms,
            explorer_cpu_rereg=round(cpu_rereg, 3),
            gen_cpu=round(s["gen_cpu"], 3),
            gens=len(outs),
            connect_s=round(connect_s, 1),
            connect_failed=sum(o["connect_failed"] for o in outs),
            lost_inflight=sum(o["lost_inflight"] for o in outs),
            hb_err=s["errors"],
            **gen_details(outs),
        )
        if rereg is None:
            pauses = f"reactor pauses n/a (the explorer exports no {LAG})"
        else:
            pauses = f"{rereg} pauses > {le_r:g} s while re-registering"
            if le_r != 0.2:
                pauses += " (no 0.2 s bucket)"
            pauses += f", {steady} > {le_s:g} s in the {cfg['restart_steady']:g} s after"
            if le_s != 0.05:
                pauses += " (no 0.05 s bucket)"
        online_ok = online_s is not None and online_s <= limit
        res.goal(
            "restart",
            (
                f"all {n:,} online {online_s:.1f} s after the new explorer's start"
                if online_s is not None
                else f"{online or 0:,} of {n:,} online after {bound:g} s"
            )
            + f" (listening after {listen_s:.1f} s; the old one took {down_s:.1f} s "
            f"to exit); {pauses}",
            online_ok and (None if rereg is None else rereg == 0 and steady == 0),
            row=row,
            n=n,
            interval=interval,
            limit=limit,
        )
    finally:
        for gp in gens:
            procs.stop(gp, signal.SIGKILL)
        procs.stop(exp)
