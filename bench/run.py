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
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import loadgen  # noqa: E402

PY = os.path.join(ROOT, ".venv", "bin", "python")
if not os.path.exists(PY):
    PY = sys.executable
TWISTD = os.path.join(os.path.dirname(PY), "twistd")


def twistd_cmd():
    """twistd of the venv; through the interpreter when the script is missing."""
    if os.path.exists(TWISTD):
        return [TWISTD]
    return [PY, "-c", "import sys; sys.argv[0] = 'twistd'; "
            "from twisted.scripts.twistd import run; run()"]
PYSPY = os.path.join(os.path.dirname(PY), "py-spy")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
ENV.pop("EXPLORER_TCP_ADDR", None)
ENV.pop("NODE_OFFLINE_AFTER", None)
SECTIONS = ["floor", "transport", "ingest", "proxy", "failure", "profile"]
DEFAULT_SECTIONS = ["floor", "transport", "ingest", "proxy", "failure"]
NCPU = os.cpu_count() or 1
SERVER_CPU = {0} if NCPU > 1 else None
CLIENT_CPU = set(range(1, NCPU)) if NCPU > 1 else None
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ processes


class Procs:
    """Starts processes and guarantees they are all killed."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []
        self.n = 0

    def start(self, cmd, name, cpus=None, nofile=None, stdin=None, stdout_pipe=False):
        self.n += 1
        logpath = os.path.join(self.tmp, f"{self.n:02d}-{name}.log")
        logf = open(logpath, "wb")

        def pre():
            os.setpgrp()
            if cpus:
                os.sched_setaffinity(0, cpus)
            if nofile:
                soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))

        p = subprocess.Popen(
            cmd, env=ENV, cwd=self.tmp, preexec_fn=pre,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else logf,
            stderr=logf if stdout_pipe else subprocess.STDOUT,
        )
        p.logpath = logpath
        p.name = name
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=5.0):
        if p.poll() is None:
            try:
                p.send_signal(sig)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            except ProcessLookupError:
                pass
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in list(self.procs):
            try:
                self.stop(p, signal.SIGKILL if p.name.startswith("loadgen") else signal.SIGTERM)
            except Exception:
                pass


def wait_for(path, pattern, timeout=15.0, proc=None):
    """Wait for a regex in a log file; return the match."""
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        try:
            with open(path, "r", errors="replace") as f:
                m = rx.search(f.read())
            if m:
                return m
        except FileNotFoundError:
            pass
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    with open(path, errors="replace") as f:
        tail = f.read()[-2000:]
    raise RuntimeError(f"{pattern!r} not seen in {path} within {timeout}s:\n{tail}")


def start_explorer(procs, tmp, name="explorer", offline_after=None, cpus=SERVER_CPU,
                   nofile=None, prefix=()):
    sock = os.path.join(tmp, f"{name}.sock")
    cmd = list(prefix) + twistd_cmd() + ["-n", "--pidfile=", "explorer", "--socket", sock,
                          "--tcp", "127.0.0.1:0"]
    if offline_after is not None:
        cmd += ["--offline-after", str(offline_after)]
    p = procs.start(cmd, name, cpus=cpus, nofile=nofile)
    m = wait_for(p.logpath, r"listening on tcp://127\.0\.0\.1:(\d+)", proc=p)
    wait_for(p.logpath, r"listening on unix://", proc=p)
    p.sock, p.port = sock, int(m.group(1))
    return p


def start_node(procs, tmp, name, explorer_uri, interval=10.0, cpus=None):
    sock = os.path.join(tmp, f"{name}.sock")
    cmd = twistd_cmd() + ["-n", "--pidfile=", "node", "--socket", sock, "--tcp", "127.0.0.1:0",
           "--explorer", explorer_uri, "--interval", str(interval),
           "--state-dir", os.path.join(tmp, f"{name}-state"), "--node-id", name]
    p = procs.start(cmd, name, cpus=cpus)
    m = wait_for(p.logpath, r"listening on tcp://127\.0\.0\.1:(\d+)", proc=p)
    p.sock, p.port, p.node_id = sock, int(m.group(1)), name
    return p


def pid_of_twistd(p):
    """The pid of the Python process (p itself, or the child of a prefix like py-spy)."""
    return p.pid


def proc_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


# ------------------------------------------------------------------ tiny sync client


def rpc(target, method, params=None, timeout=10.0):
    """One JSON-RPC call over a fresh connection; target is a socket path or a port."""
    body = json.dumps({"jsonrpc": "2.0", "method": method, "id": 1,
                       **({"params": params} if params is not None else {})}).encode()
    if isinstance(target, int):
        s = socket.create_connection(("127.0.0.1", target), timeout=timeout)
    else:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(target)
    try:
        s.sendall(loadgen.http_request(body, close=True))
        p = loadgen._Parser()
        while True:
            data = s.recv(1 << 20)
            if not data:
                raise RuntimeError("connection closed before a response")
            got = p.feed(data)
            if got:
                status, payload = got[0]
                msg = json.loads(payload)
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
    finally:
        s.close()


# ------------------------------------------------------------------ load generation


def run_closed(procs, target, conns, duration, warmup, close=False, body=None,
               expect='"result"', nprocs=1, server_pid=None):
    """Run the Python closed-loop generator (nprocs processes); merged stats."""
    per = [conns // nprocs + (1 if i < conns % nprocs else 0) for i in range(nprocs)]
    ps = []
    for i, c in enumerate(per):
        cmd = [PY, os.path.join(HERE, "loadgen.py"), "closed", "--conns", str(c),
               "--duration", str(duration), "--warmup", str(warmup), "--expect", expect]
        cmd += ["--unix", target] if isinstance(target, str) else ["--port", str(target)]
        if close:
            cmd.append("--close")
            if not isinstance(target, str):
                for k in range(2, 34):
                    cmd += ["--src", f"127.0.0.{k}"]
        if body:
            cmd += ["--body", body]
        ps.append(procs.start(cmd, f"loadgen{i}", cpus=CLIENT_CPU, stdout_pipe=True))
    srv = _server_cpu_window(server_pid, warmup + 0.3, duration - 0.3)
    outs = []
    for p in ps:
        out, _ = p.communicate(timeout=warmup + duration + 60)
        procs.procs.remove(p)
        outs.append(json.loads(out.decode().strip().splitlines()[-1]))
    return _with_server(summarize(outs), srv)


def _server_cpu_window(pid, start_in, length):
    """Server CPU share of one core over a window starting C{start_in} s from now."""
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
    h = loadgen.merge_histograms(o[hist_key] for o in outs)
    dur = max(o["duration"] for o in outs)
    ok = sum(o["ok"] for o in outs)
    res = {
        "ok": ok, "rps": ok / dur if dur else 0.0,
        "errors": sum(o["errors"] for o in outs),
        "conn_errors": sum(o["conn_errors"] for o in outs),
        "p50_ms": _ms(loadgen.percentile(h, 0.50)),
        "p99_ms": _ms(loadgen.percentile(h, 0.99)),
        "gen_cpu": sum(o["cpu_s"] for o in outs) / dur if dur else 0.0,
        "error_samples": sum((o["error_samples"] for o in outs), [])[:3],
    }
    return res


def _ms(s):
    return None if s is None else round(s * 1000, 3)


WRK_LUA = """
wrk.method = "POST"
wrk.path = "/rpc"
wrk.body = '{"jsonrpc":"2.0","method":"explorer.info","id":1}'
wrk.headers["Content-Type"] = "application/json"
%s
done = function(summary, latency, requests)
  io.write(string.format("WRKJSON {\\"requests\\":%%d,\\"duration_us\\":%%d,"
    .. "\\"p50_us\\":%%d,\\"p99_us\\":%%d,\\"errors\\":%%d,\\"non2xx\\":%%d,\\"connect\\":%%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, summary.errors.connect))
end
"""


def run_wrk(procs, tmp, port, conns, duration, close=False, server_pid=None):
    lua = os.path.join(tmp, "close.lua" if close else "keep.lua")
    with open(lua, "w") as f:
        f.write(WRK_LUA % ('wrk.headers["Connection"] = "close"' if close else ""))
    cmd = ["wrk", "-t", "1", "-c", str(conns), "-d", f"{max(1, int(duration))}s",
           "-s", lua, f"http://127.0.0.1:{port}/rpc"]
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
    r = {"ok": ok, "rps": ok / dur, "errors": d["errors"] + d["non2xx"],
            "conn_errors": d["connect"], "p50_ms": d["p50_us"] / 1000,
            "p99_ms": d["p99_us"] / 1000, "gen_cpu": gen, "error_samples": []}
    return _with_server(r, srv)


# ------------------------------------------------------------------ results


class Results:
    def __init__(self):
        self.rows = []
        self.notes = []
        self.targets = []

    def add(self, section, case, tput=None, p50=None, p99=None, **extra):
        row = {"section": section, "case": case, "throughput": tput, "p50_ms": p50,
               "p99_ms": p99, "extra": extra}
        self.rows.append(row)
        log(f"{section:9} {case:42} {_f(tput):>10} {_f(p50):>8} {_f(p99):>8} "
            + " ".join(f"{k}={_f(v)}" for k, v in extra.items()))
        return row

    def target(self, name, met, detail):
        self.targets.append({"target": name, "met": bool(met), "detail": detail})

    def note(self, text):
        self.notes.append(text)


def _f(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def git_rev():
    """The commit under test (plus '+dirty' when hero_compute/ has local changes)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hero_compute"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        return rev + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    tw = subprocess.run([PY, "-c", "import twisted; print(twisted.__version__)"],
                        capture_output=True, text=True, env=ENV).stdout.strip()
    pyv = subprocess.run([PY, "-c", "import platform; print(platform.python_version())"],
                         capture_output=True, text=True).stdout.strip()
    return {"cpu": model, "cores": NCPU, "python": pyv, "twisted": tw, "commit": git_rev(),
            "kernel": platform.release(),
            "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}


def render(results, mach, args):
    head = ["section", "case", "throughput", "p50 ms", "p99 ms", "details"]
    rows = []
    for r in results.rows:
        rows.append([r["section"], r["case"], _f(r["throughput"]), _f(r["p50_ms"]),
                     _f(r["p99_ms"]),
                     " ".join(f"{k}={_f(v)}" for k, v in r["extra"].items())])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa
    text = [f"machine: {mach['cpu']}, {mach['cores']} cores, Python {mach['python']}, "
            f"Twisted {mach['twisted']}, Linux {mach['kernel']}, "
            f"RLIMIT_NOFILE hard {mach['nofile_hard']}, commit {mach['commit']}",
            f"mode: {'quick' if args.quick else 'full'}; sections: {','.join(args.sections)}",
            "", line, fmt(head), line] + [fmt(r) for r in rows] + [line, ""]
    for t in results.targets:
        text.append(f"[{'MET ' if t['met'] else 'MISS'}] {t['target']}: {t['detail']}")
    if results.notes:
        text.append("")
        text += [f"note: {n}" for n in results.notes]
    md = [f"**machine**: {mach['cpu']}, {mach['cores']} cores, Python {mach['python']}, "
          f"Twisted {mach['twisted']}, Linux {mach['kernel']}, commit {mach['commit']}", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    md += [""] + [f"- {'MET' if t['met'] else 'MISSED'}: {t['target']}: {t['detail']}"
                  for t in results.targets]
    md += [""] + [f"- note: {n}" for n in results.notes]
    return "\n".join(text), "\n".join(md) + "\n"


# ------------------------------------------------------------------ sections


def _x(r, **more):
    """The detail columns of a load run."""
    d = {"srv_cpu": r.get("srv_cpu"), "us_per_req": r.get("us_per_req"),
         "gen_cpu": None if r.get("gen_cpu") is None else round(r["gen_cpu"], 3),
         "err": r["errors"] + r["conn_errors"]}
    d.update(more)
    return d


def _best(fn, reps):
    """Best (highest req/s) of C{reps} runs: the floor of a noisy VM is its best run."""
    runs = [fn() for _ in range(reps)]
    return max(runs, key=lambda r: r["rps"])


def sec_floor(procs, tmp, res, cfg):
    """JSON-RPC explorer.info vs two fixed-answer floors: a bare twisted.web resource
    (the framework floor) and our own HTTP protocol with no dispatch."""
    exp = start_explorer(procs, tmp, "floor-explorer")
    floors = {}
    for kind in ("twisted-web", "hero-http"):
        sock = os.path.join(tmp, f"bare-{kind}.sock")
        p = procs.start([PY, os.path.join(HERE, "bare_server.py"), sock, kind],
                        f"bare-{kind}", cpus=SERVER_CPU)
        m = wait_for(p.logpath, r"listening on tcp://127\.0\.0\.1:(\d+)", proc=p)
        floors[kind] = (p, sock, int(m.group(1)))
    try:
        c, reps = cfg["conns"], cfg["reps"]
        runs = [("unix", "py"), ("tcp", "py")]
        if cfg["wrk"]:
            runs.append(("tcp", "wrk"))

        def load(label, gen, target, pid):
            if gen == "py":
                return _best(lambda: run_closed(procs, target, c, cfg["dur"], cfg["warm"],
                                                server_pid=pid), reps)
            return _best(lambda: run_wrk(procs, tmp, target, c, cfg["dur"],
                                         server_pid=pid), reps)

        for label, gen in runs:
            pick = (lambda sock, port: sock) if label == "unix" else (lambda sock, port: port)
            r_rpc = load(label, gen, pick(exp.sock, exp.port), exp.pid)
            ratios = {}
            for kind, (p, sock, port) in floors.items():
                r = load(label, gen, pick(sock, port), p.pid)
                res.add("floor", f"{kind} fixed body, {label}, keep-alive ({gen})", r["rps"],
                        r["p50_ms"], r["p99_ms"], **_x(r))
                ratios[kind] = (r_rpc["rps"] / r["rps"] if r["rps"] else 0, r)
            res.add("floor", f"explorer.info, {label}, keep-alive ({gen})", r_rpc["rps"],
                    r_rpc["p50_ms"], r_rpc["p99_ms"],
                    **_x(r_rpc, **{f"ratio_vs_{k}": round(v[0], 3) for k, v in ratios.items()}))
            ratio, r_bare = ratios["twisted-web"]
            res.target(f"floor {label} ({gen}): JSON-RPC >= 80% of bare twisted.web",
                       ratio >= 0.8,
                       f"{ratio:.0%} by calls/s ({r_rpc['rps']:.0f} vs {r_bare['rps']:.0f}); "
                       f"vs our HTTP layer with no dispatch {ratios['hero-http'][0]:.0%}")
    finally:
        procs.stop(exp)
        for p, _, _ in floors.values():
            procs.stop(p)


def sec_transport(procs, tmp, res, cfg):
    """explorer.info over unix, native TCP and TCP through socat."""
    exp = start_explorer(procs, tmp, "transport-explorer")
    # socat picks no port itself: take a free one from the kernel and hand it over.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socat_port = s.getsockname()[1]
    s.close()
    socat = procs.start(["socat", f"TCP-LISTEN:{socat_port},fork,reuseaddr,bind=127.0.0.1,backlog=1024",
                         f"UNIX-CONNECT:{exp.sock}"], "socat", cpus=None)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", socat_port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        c, reps = cfg["conns"], 1
        table = {}
        for close in (False, True):
            mode = "new conn/request" if close else "keep-alive"
            runs = [("unix", "py", exp.sock), ("tcp native", "py", exp.port),
                    ("tcp via socat", "py", socat_port)]
            if cfg["wrk"]:
                runs += [("tcp native", "wrk", exp.port), ("tcp via socat", "wrk", socat_port)]
            for label, gen, target in runs:
                if gen == "py":
                    fn = lambda: run_closed(procs, target, c, cfg["dur"], cfg["warm"],  # noqa
                                            close=close, server_pid=exp.pid)
                else:
                    fn = lambda: run_wrk(procs, tmp, target, c, cfg["dur"], close=close,  # noqa
                                         server_pid=exp.pid)
                r = _best(fn, reps)
                table[(label, close, gen)] = r
                res.add("transport", f"{label}, {mode} ({gen})", r["rps"], r["p50_ms"],
                        r["p99_ms"], **_x(r))
            for gen in ("py", "wrk"):
                n, s_ = table.get(("tcp native", close, gen)), table.get(("tcp via socat", close, gen))
                if not n or not s_ or not s_["rps"]:
                    continue
                ratio = n["rps"] / s_["rps"]
                need = 1.5 if close else 1.0
                res.add("transport", f"ratio native/socat, {mode} ({gen})", round(ratio, 2),
                        p50_native_over_socat=round(n["p50_ms"] / s_["p50_ms"], 2)
                        if s_["p50_ms"] else None)
                res.target(f"native TCP >= {need}x socat, {mode} ({gen})", ratio >= need,
                           f"{ratio:.2f}x ({n['rps']:.0f} vs {s_['rps']:.0f} req/s, p50 "
                           f"{n['p50_ms']} vs {s_['p50_ms']} ms)")
        res.note("transport: srv_cpu is the explorer's CPU only; through socat the "
                 "socat processes add their own CPU, unpinned")
    finally:
        procs.stop(socat, signal.SIGTERM)
        procs.stop(exp)


def sec_ingest(procs, tmp, res, cfg):
    for n in cfg["ingest_n"]:
        _ingest_one(procs, tmp, res, cfg, n)


def _ingest_one(procs, tmp, res, cfg, n, profile_out=None):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = hard
    # The explorer's fd limit caps the connections; beyond it, several simulated nodes
    # share one connection (each keeps its own 10 s schedule).
    max_conns = max(100, min(nofile - 200, 60000))
    conns = min(n, max_conns)
    exp = start_explorer(procs, tmp, f"ingest{n}-explorer", cpus=SERVER_CPU, nofile=nofile)
    pid = exp.pid
    gens = []
    spy = None
    try:
        # warm the code paths before taking the idle RSS
        rpc(exp.sock, "explorer.info")
        time.sleep(0.3)
        rss_idle = proc_rss(pid)
        per_gen_conns = 9000
        ngen = max(1, math.ceil(conns / per_gen_conns))
        first = 0
        for g in range(ngen):
            gconns = conns // ngen + (1 if g < conns % ngen else 0)
            gnodes = n // ngen + (1 if g < n % ngen else 0)
            srcs = []
            for k in range(2, 2 + max(1, math.ceil(gconns / 5000))):
                srcs += ["--src", f"127.0.{g + 1}.{k}"]
            cmd = [PY, os.path.join(HERE, "loadgen.py"), "heartbeat", "--port", str(exp.port),
                   "--nodes", str(gnodes), "--first", str(first), "--total-nodes", str(n),
                   "--conns", str(gconns), "--interval", str(cfg["hb_interval"])] + srcs
            first += gnodes
            gens.append(procs.start(cmd, f"loadgen-hb{g}", cpus=CLIENT_CPU, stdin=True,
                                    stdout_pipe=True))
        connect_s = 0.0
        for gp in gens:
            line = gp.stdout.readline()
            if not line:
                raise RuntimeError(f"heartbeat generator died: {open(gp.logpath).read()[-1500:]}")
            connect_s = max(connect_s, json.loads(line)["connect_s"])
        interval = cfg["hb_interval"]
        t0 = time.time() + 0.5
        w0 = t0 + interval  # first round registers every node; measure the steady state
        w1 = w0 + cfg["hb_window"]
        end = w1 + 1.5
        ctl = json.dumps({"t0": t0, "w0": w0, "w1": w1, "end": end}) + "\n"
        for gp in gens:
            gp.stdin.write(ctl.encode())
            gp.stdin.flush()
        time.sleep(max(0, w0 - time.time()))
        cpu0, tw0 = proc_cpu(pid), time.time()
        if profile_out:
            spy = procs.start([PYSPY, "record", "-p", str(pid), "-r", "250", "-f", "raw",
                               "-o", profile_out, "-d", str(int(cfg["hb_window"]))],
                              "py-spy", cpus=CLIENT_CPU)
        time.sleep(max(0, w1 - time.time()))
        cpu1, tw1 = proc_cpu(pid), time.time()
        rss = proc_rss(pid)
        info = rpc(exp.sock, "explorer.info", timeout=30)
        offline = rpc(exp.sock, "explorer.list_nodes", {"status": "offline"}, timeout=60)
        outs = []
        for gp in gens:
            out, _ = gp.communicate(timeout=end - time.time() + 60)
            procs.procs.remove(gp)
            outs.append(json.loads(out.decode().strip().splitlines()[-1]))
        gens = []
        if spy:
            spy.wait(30)
            procs.procs.remove(spy)
        s = summarize(outs)
        late = loadgen.merge_histograms(o["lateness"] for o in outs)
        cpu_share = (cpu1 - cpu0) / (tw1 - tw0)
        per_node = (rss - rss_idle) / n
        expected = n * cfg["hb_window"] / interval
        res.add("ingest", f"N={n:,} nodes, {conns:,} conns, every {interval:g}s"
                + (" (under py-spy)" if profile_out else ""),
                s["rps"], s["p50_ms"], s["p99_ms"],
                explorer_cpu=round(cpu_share, 3), rss_mb=round(rss / 2**20, 1),
                bytes_per_node=round(per_node), online=info["nodes"]["online"],
                never_registered=n - info["nodes"]["online"] - info["nodes"]["offline"],
                wrongly_offline=len(offline), gen_cpu=round(s["gen_cpu"], 3),
                send_delay_p99_ms=_ms(loadgen.percentile(late, 0.99)),
                expected_hb=round(expected), ok=s["ok"], err=s["errors"] + s["conn_errors"],
                connect_s=round(connect_s, 1), nofile=nofile)
        if s["error_samples"]:
            res.note(f"ingest N={n}: error samples {s['error_samples']}")
        if not profile_out:
            rate = n / interval
            ok = s["rps"] >= 0.98 * rate and (s["p99_ms"] or 1e9) < 50
            if n >= 50000 or n == max(cfg["ingest_n"]):
                res.target(f"ingest N={n:,}: >= {rate:,.0f} heartbeats/s with p99 < 50 ms "
                           "on one core", ok,
                           f"{s['rps']:,.0f}/s, p99 {s['p99_ms']} ms, explorer CPU "
                           f"{cpu_share:.0%} of a core")
            res.target(f"ingest N={n:,}: no node wrongly offline", not offline,
                       f"{len(offline)} offline, {info['nodes']['online']} online")
        return s, cpu_share, len(offline), conns
    finally:
        for gp in gens:
            procs.stop(gp, signal.SIGKILL)
        if spy:
            procs.stop(spy)
        procs.stop(exp)


def sec_proxy(procs, tmp, res, cfg):
    exp = start_explorer(procs, tmp, "proxy-explorer", cpus=None)
    nu = start_node(procs, tmp, "bench-node-unix", f"unix://{exp.sock}", cpus=None)
    nt = start_node(procs, tmp, "bench-node-tcp", f"tcp://127.0.0.1:{exp.port}", cpus=None)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            nodes = {x["node_id"]: x for x in rpc(exp.sock, "explorer.list_nodes")}
            if all(k in nodes and nodes[k]["status"] == "online"
                   for k in (nu.node_id, nt.node_id)):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("nodes did not come online")
        assert nodes[nu.node_id]["socket_path"].startswith("unix://"), nodes[nu.node_id]
        assert nodes[nt.node_id]["socket_path"].startswith("tcp://"), nodes[nt.node_id]
        info = '{"jsonrpc":"2.0","method":"node.info","id":1}'

        def via(node_id):
            return json.dumps({"jsonrpc": "2.0", "method": "explorer.call", "id": 1,
                               "params": {"node_id": node_id, "method": "node.info"}})

        cases = [
            ("direct node.info, unix", nu.sock, info, None),
            ("explorer.call (unix) -> node unix://", exp.sock, via(nu.node_id),
             "direct node.info, unix"),
            ("direct node.info, tcp", nt.port, info, None),
            ("explorer.call (tcp) -> node tcp://", exp.port, via(nt.node_id),
             "direct node.info, tcp"),
        ]
        got = {}
        for name, target, body, base in cases:
            r1 = run_closed(procs, target, 1, cfg["proxy_dur"], cfg["warm"], body=body,
                            expect='"node_id"')
            rn = run_closed(procs, target, 8, cfg["proxy_dur"], cfg["warm"], body=body,
                            expect='"node_id"')
            got[name] = (r1, rn)
            extra = {"rps_8conns": rn["rps"], "err": r1["errors"] + rn["errors"]}
            if base:
                b1, bn = got[base]
                extra["added_p50_ms"] = round(r1["p50_ms"] - b1["p50_ms"], 3)
                extra["added_p99_ms"] = round(r1["p99_ms"] - b1["p99_ms"], 3)
                extra["tput_ratio"] = round(rn["rps"] / bn["rps"], 3) if bn["rps"] else None
                res.target(f"proxy adds < 1 ms p50 ({name})", extra["added_p50_ms"] < 1.0,
                           f"+{extra['added_p50_ms']:.3f} ms p50, +{extra['added_p99_ms']:.3f}"
                           f" ms p99, throughput x{extra['tput_ratio']}")
            res.add("proxy", name + " (1 conn)", r1["rps"], r1["p50_ms"], r1["p99_ms"], **extra)
    finally:
        procs.stop(nu)
        procs.stop(nt)
        procs.stop(exp)


def sec_failure(procs, tmp, res, cfg):
    after = 3.0
    exp = start_explorer(procs, tmp, "failure-explorer", offline_after=after, cpus=None)
    try:
        for how in ("SIGKILL", "SIGTERM (leave)"):
            times = []
            for i in range(cfg["fail_reps"]):
                node_id = f"bench-fail-{i}"
                node = start_node(procs, tmp, node_id, f"unix://{exp.sock}", interval=1.0)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    try:
                        if rpc(exp.sock, "explorer.get_node", {"node_id": node_id})["status"] == "online":
                            break
                    except RuntimeError:
                        pass
                    time.sleep(0.05)
                else:
                    raise RuntimeError("node did not come online")
                time.sleep(1.0 + 0.37 * i)  # vary the phase against the heartbeat
                sig = signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM
                t_cut = time.monotonic()
                node.send_signal(sig)
                detected = None
                while time.monotonic() - t_cut < after + 10:
                    st = rpc(exp.sock, "explorer.get_node", {"node_id": node_id})["status"]
                    if st == "offline":
                        detected = time.monotonic() - t_cut
                        break
                    time.sleep(0.05)
                procs.stop(node, signal.SIGKILL)
                times.append(detected)
                try:
                    rpc(exp.sock, "explorer.remove_node", {"node_id": node_id})
                except RuntimeError:
                    pass
            ok = [t for t in times if t is not None]
            res.add("failure", f"{how} -> offline (offline_after={after:g}s, interval 1s)",
                    None, round(sorted(ok)[len(ok) // 2] * 1000, 1) if ok else None,
                    round(max(ok) * 1000, 1) if ok else None,
                    min_ms=round(min(ok) * 1000, 1) if ok else None, reps=len(times),
                    undetected=len(times) - len(ok))
        res.note("failure rows: p50/p99 columns are the median/max detection time in ms "
                 "over the repetitions (polling explorer.get_node every 50 ms)")
    finally:
        procs.stop(exp)


def sec_profile(procs, tmp, res, cfg):
    """py-spy on the explorer under the floor load and under heartbeat ingest."""
    if not os.path.exists(PYSPY):
        res.note("profile skipped: py-spy not installed (pip install py-spy into the venv)")
        return
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    # floor: explorer.info over unix, keep-alive
    exp = start_explorer(procs, tmp, "profile-explorer")
    raw_floor = os.path.join(out_dir, "profile-floor.txt")
    try:
        spy = procs.start([PYSPY, "record", "-p", str(exp.pid), "-r", "250", "-f", "raw",
                           "-o", raw_floor, "-d", str(int(cfg["dur"] + 1))], "py-spy",
                          cpus=CLIENT_CPU)
        r = run_closed(procs, exp.sock, cfg["conns"], cfg["dur"], 1.0)
        spy.wait(30)
        procs.procs.remove(spy)
        res.add("profile", "explorer.info unix keep-alive under py-spy", r["rps"],
                r["p50_ms"], r["p99_ms"])
    finally:
        procs.stop(exp)
    raw_ingest = os.path.join(out_dir, "profile-ingest.txt")
    n = cfg["profile_n"]
    _ingest_one(procs, tmp, res, cfg, n, profile_out=raw_ingest)
    for label, path in (("floor", raw_floor), ("ingest", raw_ingest)):
        if os.path.exists(path):
            summary = summarize_profile(path)
            with open(os.path.join(out_dir, f"profile-{label}-summary.txt"), "w") as f:
                f.write(summary)
            print(f"\n=== profile: {label} ({path}) ===\n{summary}", flush=True)


CATEGORIES = [
    ("JSON decode (json.loads)", r"json/decoder\.py|\bloads \(json"),
    ("JSON encode (_dump/encode)", r"json/encoder\.py|_dump \("),
    ("schema coerce/validate (jsonschema)", r"jsonschema/|coerce_params"),
    ("signature.bind (inspect)", r"inspect\.py"),
    ("dispatch (_handle_one/_prepare)", r"_handle_one \(|_prepare \("),
    ("Deferred machinery", r"twisted/internet/defer\.py"),
    ("HTTP parsing/channel (twisted.web.http)", r"twisted/web/http\.py"),
    ("twisted.web.server Request/Site", r"twisted/web/server\.py"),
    ("HTTP headers (http_headers)", r"twisted/web/http_headers\.py"),
    ("logging (twisted.logger)", r"twisted/logger/"),
    ("CallContext.from_request", r"from_request \("),
    ("explorer heartbeat handler", r"heartbeat \(hero_compute/explorer"),
    ("registry", r"explorer/registry\.py"),
    ("address parsing", r"rpc/addresses\.py"),
    ("attrs-generated (__init__/evolve)", r"attrs|<attrs generated"),
    ("Content-Type parse (email.message via http._parseContentType)", r"_parseContentType"),
    ("getHost/getsockname per request", r"getHost \(|_getsockname"),
    ("response write + epoll register/unregister", r"EPollReactor\._(add|remove)"),
]

#: Self-time buckets (the leaf frame of each sample).
SELF_BUCKETS = [
    ("syscalls: recv/send/epoll (sendmsg, untilConcludes, doPoll, _add/_remove, doRead)",
     r"sendmsg\.py|untilConcludes|doPoll|EPollReactor\._(add|remove)|Connection\.doRead|"
     r"writeSomeData|_getsockname|getHost"),
    ("jsonschema/referencing", r"jsonschema/|referencing/"),
    ("email.* (Content-Type parsing)", r"email/"),
    ("json encode/decode", r"json/"),
    ("twisted.web", r"twisted/web/"),
    ("Deferred", r"twisted/internet/defer\.py"),
    ("twisted.logger", r"twisted/logger/"),
    ("hero_compute", r"hero_compute/"),
    ("inspect", r"inspect\.py"),
]


def summarize_profile(path, top=25):
    stacks = []
    total = 0
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, cnt = line.rpartition(" ")
            try:
                cnt = int(cnt)
            except ValueError:
                continue
            frames = stack.split(";")
            stacks.append((frames, cnt))
            total += cnt
    if not total:
        return "no samples\n"
    self_c, incl_c = Counter(), Counter()
    for frames, cnt in stacks:
        names = [re.sub(r":\d+\)$", ")", fr.strip()) for fr in frames]
        self_c[names[-1]] += cnt
        for nm in set(names):
            incl_c[nm] += cnt
    out = [f"samples: {total} (active only)", "", "top self time:"]
    for nm, c in self_c.most_common(top):
        out.append(f"  {100 * c / total:5.1f}%  {nm}")
    out += ["", "top inclusive (non-boilerplate):"]
    skip = ("<module>", "run (", "mainLoop", "runApp", "startReactor", "postApplication",
            "runReactorWithLogging", "ApplicationRunner.run", "ReactorBase.run")
    k = 0
    for nm, c in incl_c.most_common(200):
        if any(s in nm for s in skip):
            continue
        out.append(f"  {100 * c / total:5.1f}%  {nm}")
        k += 1
        if k >= top:
            break
    out += ["", "self-time buckets (leaf frame):"]
    for label, rx in SELF_BUCKETS:
        r = re.compile(rx)
        c = sum(cnt for frames, cnt in stacks if r.search(frames[-1]))
        out.append(f"  {100 * c / total:5.1f}%  {label}")
    out += ["", "categories (inclusive, a sample counts once per category):"]
    for label, rx in CATEGORIES:
        r = re.compile(rx)
        c = sum(cnt for frames, cnt in stacks if any(r.search(fr) for fr in frames))
        out.append(f"  {100 * c / total:5.1f}%  {label}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~1-2 minute run")
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} "
                         f"(default: all but profile; 'all' for everything)")
    ap.add_argument("--no-wrk", action="store_true", help="skip the wrk runs")
    ap.add_argument("--ingest-n", help="comma-separated node counts for ingest")
    ap.add_argument("--conns", type=int, help="connections for floor/transport")
    args = ap.parse_args(argv)
    args.sections = SECTIONS if args.sections == "all" else [
        s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {SECTIONS}")
    q = args.quick
    cfg = {
        "conns": args.conns or 16,
        "reps": 1 if q else 2,
        "dur": 2.0 if q else 6.0,
        "warm": 0.7 if q else 1.5,
        "wrk": not args.no_wrk and shutil.which("wrk") is not None,
        "ingest_n": [int(x) for x in args.ingest_n.split(",")] if args.ingest_n
        else ([1000, 5000] if q else [1000, 10000, 50000]),
        "hb_interval": 10.0,
        "hb_window": 4.0 if q else 15.0,
        "proxy_dur": 2.0 if q else 4.0,
        "fail_reps": 1 if q else 3,
        "profile_n": 5000 if q else 50000,
    }
    mach = machine()
    res = Results()
    res.note(f"server processes pinned to CPU {sorted(SERVER_CPU) if SERVER_CPU else '-'}, "
             f"load generators to CPU {sorted(CLIENT_CPU) if CLIENT_CPU else '-'} "
             "(socat, proxy and failure runs unpinned)")
    res.note(f"floor/transport: {cfg['conns']} concurrent connections, closed loop; "
             "(py) = bench/loadgen.py, (wrk) = wrk -t1 with a Lua POST script; "
             "gen_cpu = generator CPU share of one core")
    res.note(f"ingest: RLIMIT_NOFILE raised to the hard limit {mach['nofile_hard']} in "
             "the explorer (preexec setrlimit) and generators; where N exceeds it, "
             "several simulated nodes share one connection, each on its own schedule; "
             "latency is from the scheduled send time; send_delay = scheduled -> written, i.e. "
             "generator lateness plus waiting behind a shared connection's request in flight")
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
                globals()[f"sec_{sec}"](procs, tmp, res, cfg)
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
        res.note(f"WARNING: the code changed during the run ({mach['commit']} -> {end_rev}); "
                 "sections may have measured different versions")
    text, md = render(res, mach, args)
    print(text)
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = {"machine": mach, "quick": q, "sections": args.sections, "config": cfg,
            "rows": res.rows, "targets": res.targets, "notes": res.notes}
    for name in (stamp, "latest"):
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(data, f, indent=1)
        with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
            f.write(md)
    log(f"results written to {out_dir}/{stamp}.json and .md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
