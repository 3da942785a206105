"""
Driving load against a server: the Python closed-loop generator (``bench/loadgen.py``)
and wrk, with the server's CPU share sampled over the measured window, and the merged
statistics of a run.
"""

import json
import os
import re
import time

import loadcore
from procs import CLIENT_CPU, HERE, PY, proc_cpu


def run_closed(
    procs,
    target,
    conns,
    duration,
    warmup,
    close=False,
    body=None,
    expect='"result"',
    nprocs=1,
    server_pid=None,
    extra_args=(),
):
    """Run the Python closed-loop generator (nprocs processes); merged stats."""
    per = [conns // nprocs + (1 if i < conns % nprocs else 0) for i in range(nprocs)]
    ps = []
    for i, c in enumerate(per):
        cmd = [
            PY,
            os.path.join(HERE, "loadgen.py"),
            "closed",
            "--conns",
            str(c),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
            "--expect",
            expect,
        ]
        cmd += ["--unix", target] if isinstance(target, str) else ["--port", str(target)]
        if close:
            cmd.append("--close")
            if not isinstance(target, str):
                for k in range(2, 34):
                    cmd += ["--src", f"127.0.0.{k}"]
        if body:
            cmd += ["--body", body]
        cmd += list(extra_args)
        ps.append(procs.start(cmd, f"loadgen{i}", cpus=CLIENT_CPU, stdout_pipe=True))
    srv = _server_cpu_window(server_pid, warmup + 0.3, duration - 0.3)
    outs = []
    for p in ps:
        out, _ = p.communicate(timeout=warmup + duration + 60)
        procs.procs.remove(p)
        outs.append(json.loads(out.decode().strip().splitlines()[-1]))
    return _with_server(summarize(outs), srv)


def _server_cpu_window(pid, start_in, length):
    """Server CPU share of one core over a window starting ``start_in`` s from now."""
    if pid is None:
        return None
    time.sleep(max(0.0, start_in))
    c0, t0 = proc_cpu(pid), time.monotonic()
    time.sleep(max(0.1, length))
    return (proc_cpu(pid) - c0) / (time.monotonic() - t0)


def _with_server(r, srv):
    r["srv_cpu"] = None if srv is None else round(srv, 3)
    # server CPU microseconds per request: steadier than req/s on a noisy VM
    r["us_per_req"] = round(1e6 * srv / r["rps"]) if srv and r["rps"] else None
    return r


def summarize(outs, hist_key="hist"):
    h = loadcore.merge_histograms(o[hist_key] for o in outs)
    dur = max(o["duration"] for o in outs)
    ok = sum(o["ok"] for o in outs)
    res = {
        "ok": ok,
        "rps": ok / dur if dur else 0.0,
        "errors": sum(o["errors"] for o in outs),
        "conn_errors": sum(o["conn_errors"] for o in outs),
        "p50_ms": to_ms(loadcore.percentile(h, 0.50)),
        "p99_ms": to_ms(loadcore.percentile(h, 0.99)),
        "gen_cpu": sum(o["cpu_s"] for o in outs) / dur if dur else 0.0,
        "error_samples": sum((o["error_samples"] for o in outs), [])[:3],
    }
    cycle = loadcore.merge_histograms(o.get("cycle", {}) for o in outs)
    if cycle:
        res["cycle_p50_ms"] = to_ms(loadcore.percentile(cycle, 0.50))
        res["cycle_p99_ms"] = to_ms(loadcore.percentile(cycle, 0.99))
    return res


def to_ms(s):
    return None if s is None else round(s * 1000, 3)


WRK_LUA = """
wrk.method = "POST"
wrk.path = "/rpc"
wrk.body = '{"jsonrpc":"2.0","method":"explorer.info","id":1}'
wrk.headers["Content-Type"] = "application/json"
%s
done = function(summary, latency, requests)
  io.write(string.format("WRKJSON {\\"requests\\":%%d,\\"duration_us\\":%%d,"
    .. "\\"p50_us\\":%%d,\\"p99_us\\":%%d,\\"errors\\":%%d,"
    .. "\\"non2xx\\":%%d,\\"connect\\":%%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, summary.errors.connect))
end
"""


def run_wrk(procs, tmp, port, conns, duration, close=False, server_pid=None):
    lua = os.path.join(tmp, "close.lua" if close else "keep.lua")
    with open(lua, "w") as f:
        f.write(WRK_LUA % ('wrk.headers["Connection"] = "close"' if close else ""))
    cmd = [
        "wrk",
        "-t",
        "1",
        "-c",
        str(conns),
        "-d",
        f"{max(1, int(duration))}s",
        "-s",
        lua,
        f"http://127.0.0.1:{port}/rpc",
    ]
    p = procs.start(cmd, "loadgen-wrk", cpus=CLIENT_CPU, stdout_pipe=True)
    t0 = time.monotonic()
    g0 = proc_cpu(p.pid)
    srv = _server_cpu_window(server_pid, 0.3, max(1, int(duration)) - 0.6)
    try:
        gen = (proc_cpu(p.pid) - g0) / (time.monotonic() - t0)
    except OSError:
        gen = None
    out, _ = p.communicate(timeout=duration + 60)
    procs.procs.remove(p)
    m = re.search(r"WRKJSON (\{.*\})", out.decode())
    if not m:
        raise RuntimeError(f"wrk output without summary: {out.decode()[-1000:]}")
    d = json.loads(m.group(1))
    dur = d["duration_us"] / 1e6
    ok = d["requests"] - d["non2xx"]
    r = {
        "ok": ok,
        "rps": ok / dur,
        "errors": d["errors"] + d["non2xx"],
        "conn_errors": d["connect"],
        "p50_ms": d["p50_us"] / 1000,
        "p99_ms": d["p99_us"] / 1000,
        "gen_cpu": gen,
        "error_samples": [],
    }
    return _with_server(r, srv)


def details(r, **more):
    """The detail columns of a load run."""
    d = {
        "srv_cpu": r.get("srv_cpu"),
        "us_per_req": r.get("us_per_req"),
        "gen_cpu": None if r.get("gen_cpu") is None else round(r["gen_cpu"], 3),
        "err": r["errors"] + r["conn_errors"],
    }
    d.update(more)
    return d


def best_of(fn, reps):
    """Best (highest req/s) of ``reps`` runs: the floor of a noisy VM is its best run."""
    runs = [fn() for _ in range(reps)]
    return max(runs, key=lambda r: r["rps"])
