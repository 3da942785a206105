"""
Process handling for the benchmarks: the interpreter and twistd to run, CPU pinning,
starting and stopping twistd explorer/node processes (all killed on exit), CPU and RSS
accounting from ``/proc``, and a tiny synchronous JSON-RPC client.
"""

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import loadcore

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PY = os.path.join(ROOT, ".venv", "bin", "python")
if not os.path.exists(PY):
    PY = sys.executable
TWISTD = os.path.join(os.path.dirname(PY), "twistd")


def twistd_cmd():
    """twistd of the venv; through the interpreter when the script is missing."""
    if os.path.exists(TWISTD):
        return [TWISTD]
    return [
        PY,
        "-c",
        "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
    ]


PYSPY = os.path.join(os.path.dirname(PY), "py-spy")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
for _name in list(ENV):
    # the benchmarks set what they need; nothing of the caller's explorer/node setup
    # (addresses, TLS, state, limits) may leak in
    if _name.startswith(("EXPLORER_", "NODE_", "HERO_")):
        del ENV[_name]
#: Explorer environment for a simulated fleet from a few loopback addresses (CONTRACT
#: §7: "benchmarks that simulate a fleet from one address raise the per-address limits").
FLEET_ENV = {
    "EXPLORER_NEW_NODES_PER_ADDR": "1000000",
    "HERO_MAX_CONNS_PER_ADDR": "1000000",
}
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

    def start(
        self, cmd, name, cpus=None, nofile=None, stdin=None, stdout_pipe=False, env=None
    ):
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
            cmd,
            env=dict(ENV, **env) if env else ENV,
            cwd=self.tmp,
            preexec_fn=pre,
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
                self.stop(
                    p, signal.SIGKILL if p.name.startswith("loadgen") else signal.SIGTERM
                )
            except Exception:
                pass


def wait_for(path, pattern, timeout=15.0, proc=None):
    """Wait for a regex in a log file; return the match."""
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        try:
            with open(path, errors="replace") as f:
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


def start_explorer(
    procs,
    tmp,
    name="explorer",
    offline_after=None,
    cpus=SERVER_CPU,
    nofile=None,
    prefix=(),
    env=None,
    tcp="127.0.0.1:0",
):
    """
    An explorer on a Unix socket in ``tmp`` and TCP on a free loopback port, with its
    own state directory (never the user's ``~/hero``: a fleet from an earlier run would
    show up offline).  ``env`` adds variables (e.g. :data:`FLEET_ENV`); with
    ``EXPLORER_TLS_ADDR`` in it, its TLS port is ``p.tls_port``, with
    ``EXPLORER_METRICS_ADDR`` its metrics port ``p.metrics_port``.  The same ``name``
    again is the same socket and state directory (a restart, with ``tcp`` the port the
    first one got).
    """
    sock = os.path.join(tmp, f"{name}.sock")
    state = os.path.join(tmp, f"{name}-state")
    os.makedirs(state, exist_ok=True)
    env = dict(env or {}, EXPLORER_STATE_DIR=state)
    cmd = (
        list(prefix)
        + twistd_cmd()
        + ["-n", "--pidfile=", "explorer", "--socket", sock, "--tcp", tcp]
    )
    if offline_after is not None:
        cmd += ["--offline-after", str(offline_after)]
    p = procs.start(cmd, name, cpus=cpus, nofile=nofile, env=env)
    # the JSON-RPC listener's line ends at its port; the metrics' and dashboard's go on
    m = wait_for(p.logpath, r"(?m)listening on tcp://127\.0\.0\.1:(\d+)\s*$", proc=p)
    wait_for(p.logpath, r"listening on unix://", proc=p)
    p.sock, p.port, p.state = sock, int(m.group(1)), state
    p.tls_port = p.metrics_port = None
    if env.get("EXPLORER_TLS_ADDR"):
        m = wait_for(p.logpath, r"listening on tls://127\.0\.0\.1:(\d+)", proc=p)
        p.tls_port = int(m.group(1))
    if env.get("EXPLORER_METRICS_ADDR"):
        m = wait_for(
            p.logpath, r"listening on tcp://127\.0\.0\.1:(\d+) \(Prometheus", proc=p
        )
        p.metrics_port = int(m.group(1))
    return p


def start_node(procs, tmp, name, explorer_uri, interval=10.0, cpus=None):
    sock = os.path.join(tmp, f"{name}.sock")
    cmd = twistd_cmd() + [
        "-n",
        "--pidfile=",
        "node",
        "--socket",
        sock,
        "--tcp",
        "127.0.0.1:0",
        "--explorer",
        explorer_uri,
        "--interval",
        str(interval),
        "--state-dir",
        os.path.join(tmp, f"{name}-state"),
        "--node-id",
        name,
    ]
    p = procs.start(cmd, name, cpus=cpus)
    m = wait_for(p.logpath, r"listening on tcp://127\.0\.0\.1:(\d+)", proc=p)
    p.sock, p.port, p.node_id = sock, int(m.group(1)), name
    return p


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
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "method": method,
            "id": 1,
            **({"params": params} if params is not None else {}),
        }
    ).encode()
    if isinstance(target, int):
        s = socket.create_connection(("127.0.0.1", target), timeout=timeout)
    else:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(target)
    try:
        s.sendall(loadcore.http_request(body, close=True))
        p = loadcore.Parser()
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
