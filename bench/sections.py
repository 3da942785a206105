"""
The request/response benchmark sections, each a function
``(procs, tmp, res, cfg)``: the framework floor, native TCP vs socat, proxy overhead
and failure detection.  The heartbeat ingest and the py-spy profile are in
``ingest.py``.
"""

import functools
import json
import os
import signal
import socket
import time

from loadrun import best_of, details, run_closed, run_wrk
from procs import HERE, PY, SERVER_CPU, rpc, start_explorer, start_node, wait_for


def sec_floor(procs, tmp, res, cfg):
    """JSON-RPC explorer.info vs two fixed-answer floors: a bare twisted.web resource
    (the framework floor) and our own HTTP protocol with no dispatch."""
    exp = start_explorer(procs, tmp, "floor-explorer")
    floors = {}
    for kind in ("twisted-web", "hero-http"):
        sock = os.path.join(tmp, f"bare-{kind}.sock")
        p = procs.start(
            [PY, os.path.join(HERE, "bare_server.py"), sock, kind],
            f"bare-{kind}",
            cpus=SERVER_CPU,
        )
        m = wait_for(p.logpath, r"listening on tcp://127\.0\.0\.1:(\d+)", proc=p)
        floors[kind] = (p, sock, int(m.group(1)))
    try:
        c, reps = cfg["conns"], cfg["reps"]
        runs = [("unix", "py"), ("tcp", "py")]
        if cfg["wrk"]:
            runs.append(("tcp", "wrk"))

        def load(label, gen, target, pid):
            if gen == "py":
                return best_of(
                    lambda: run_closed(
                        procs, target, c, cfg["dur"], cfg["warm"], server_pid=pid
                    ),
                    reps,
                )
            return best_of(
                lambda: run_wrk(procs, tmp, target, c, cfg["dur"], server_pid=pid), reps
            )

        for label, gen in runs:
            pick = (
                (lambda sock, port: sock) if label == "unix" else (lambda sock, port: port)
            )
            r_rpc = load(label, gen, pick(exp.sock, exp.port), exp.pid)
            ratios = {}
            for kind, (p, sock, port) in floors.items():
                r = load(label, gen, pick(sock, port), p.pid)
                res.add(
                    "floor",
                    f"{kind} fixed body, {label}, keep-alive ({gen})",
                    r["rps"],
                    r["p50_ms"],
                    r["p99_ms"],
                    **details(r),
                )
                ratios[kind] = (r_rpc["rps"] / r["rps"] if r["rps"] else 0, r)
            res.add(
                "floor",
                f"explorer.info, {label}, keep-alive ({gen})",
                r_rpc["rps"],
                r_rpc["p50_ms"],
                r_rpc["p99_ms"],
                **details(
                    r_rpc, **{f"ratio_vs_{k}": round(v[0], 3) for k, v in ratios.items()}
                ),
            )
            ratio, r_bare = ratios["twisted-web"]
            res.target(
                f"floor {label} ({gen}): JSON-RPC >= 80% of bare twisted.web",
                ratio >= 0.8,
                f"{ratio:.0%} by calls/s ({r_rpc['rps']:.0f} vs {r_bare['rps']:.0f}); "
                f"vs our HTTP layer with no dispatch {ratios['hero-http'][0]:.0%}",
            )
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
    socat = procs.start(
        [
            "socat",
            f"TCP-LISTEN:{socat_port},fork,reuseaddr,bind=127.0.0.1,backlog=1024",
            f"UNIX-CONNECT:{exp.sock}",
        ],
        "socat",
        cpus=None,
    )
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
            runs = [
                ("unix", "py", exp.sock),
                ("tcp native", "py", exp.port),
                ("tcp via socat", "py", socat_port),
            ]
            if cfg["wrk"]:
                runs += [
                    ("tcp native", "wrk", exp.port),
                    ("tcp via socat", "wrk", socat_port),
                ]
            for label, gen, target in runs:
                if gen == "py":
                    fn = functools.partial(
                        run_closed,
                        procs,
                        target,
                        c,
                        cfg["dur"],
                        cfg["warm"],
                        close=close,
                        server_pid=exp.pid,
                    )
                else:
                    fn = functools.partial(
                        run_wrk,
                        procs,
                        tmp,
                        target,
                        c,
                        cfg["dur"],
                        close=close,
                        server_pid=exp.pid,
                    )
                r = best_of(fn, reps)
                table[(label, close, gen)] = r
                res.add(
                    "transport",
                    f"{label}, {mode} ({gen})",
                    r["rps"],
                    r["p50_ms"],
                    r["p99_ms"],
                    **details(r),
                )
            for gen in ("py", "wrk"):
                n, s_ = (
                    table.get(("tcp native", close, gen)),
                    table.get(("tcp via socat", close, gen)),
                )
                if not n or not s_ or not s_["rps"]:
                    continue
                ratio = n["rps"] / s_["rps"]
                row = res.add(
                    "transport",
                    f"ratio native/socat, {mode} ({gen})",
                    round(ratio, 2),
                    p50_native_over_socat=round(n["p50_ms"] / s_["p50_ms"], 2)
                    if s_["p50_ms"]
                    else None,
                )
                detail = (
                    f"{ratio:.2f}x ({n['rps']:.0f} vs {s_['rps']:.0f} req/s, p50 "
                    f"{n['p50_ms']} vs {s_['p50_ms']} ms)"
                )
                if not close and gen == "wrk":
                    # issue #12's goal is measured with wrk: the Python generator
                    # would be the bottleneck of both
                    res.goal("transport", detail, ratio >= 1.2, row=row)
                elif close:
                    res.target(
                        f"native TCP >= 1.5x socat, {mode} ({gen})", ratio >= 1.5, detail
                    )
        if not cfg["wrk"]:
            res.goal("transport", "n/a: wrk not installed (or --no-wrk)", None)
        res.note(
            "transport: srv_cpu is the explorer's CPU only; through socat the "
            "socat processes add their own CPU, unpinned"
        )
    finally:
        procs.stop(socat, signal.SIGTERM)
        procs.stop(exp)


def sec_proxy(procs, tmp, res, cfg):
    exp = start_explorer(procs, tmp, "proxy-explorer", cpus=None)
    nu = start_node(procs, tmp, "bench-node-unix", f"unix://{exp.sock}", cpus=None)
    nt = start_node(procs, tmp, "bench-node-tcp", f"tcp://127.0.0.1:{exp.port}", cpus=None)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            nodes = {x["node_id"]: x for x in rpc(exp.sock, "explorer.list_nodes")}
            if all(
                k in nodes and nodes[k]["status"] == "online"
                for k in (nu.node_id, nt.node_id)
            ):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("nodes did not come online")
        assert nodes[nu.node_id]["socket_path"].startswith("unix://"), nodes[nu.node_id]
        assert nodes[nt.node_id]["socket_path"].startswith("tcp://"), nodes[nt.node_id]
        info = '{"jsonrpc":"2.0","method":"node.info","id":1}'

        def via(node_id):
            return json.dumps(
                {
                    "jsonrpc": "2.0",
                    "method": "explorer.call",
                    "id": 1,
                    "params": {"node_id": node_id, "method": "node.info"},
                }
            )

        cases = [
            ("direct node.info, unix", nu.sock, info, None),
            (
                "explorer.call (unix) -> node unix://",
                exp.sock,
                via(nu.node_id),
                "direct node.info, unix",
            ),
            ("direct node.info, tcp", nt.port, info, None),
            (
                "explorer.call (tcp) -> node tcp://",
                exp.port,
                via(nt.node_id),
                "direct node.info, tcp",
            ),
        ]
        got = {}
        shares = []
        ones = []
        pids = {exp.sock: exp.pid, exp.port: exp.pid, nu.sock: nu.pid, nt.port: nt.pid}
        for name, target, body, base in cases:
            # The server's CPU per call too (us_per_req): steadier than calls/s on a
            # shared machine.
            r1 = run_closed(
                procs,
                target,
                1,
                cfg["proxy_dur"],
                cfg["warm"],
                body=body,
                expect='"node_id"',
                server_pid=pids[target],
            )
            rn = run_closed(
                procs,
                target,
                8,
                cfg["proxy_dur"],
                cfg["warm"],
                body=body,
                expect='"node_id"',
            )
            got[name] = (r1, rn)
            extra = {
                "rps_8conns": rn["rps"],
                "err": r1["errors"] + rn["errors"],
                "srv_us_per_call_1conn": r1["us_per_req"],
            }
            if base:
                b1, bn = got[base]
                extra["tput_ratio_1conn"] = (
                    round(r1["rps"] / b1["rps"], 3) if b1["rps"] else None
                )
                extra["added_p50_ms"] = round(r1["p50_ms"] - b1["p50_ms"], 3)
                extra["added_p99_ms"] = round(r1["p99_ms"] - b1["p99_ms"], 3)
                extra["tput_ratio"] = round(rn["rps"] / bn["rps"], 3) if bn["rps"] else None
                res.target(
                    f"proxy adds < 1 ms p50 ({name})",
                    extra["added_p50_ms"] < 1.0,
                    f"+{extra['added_p50_ms']:.3f} ms p50, +{extra['added_p99_ms']:.3f}"
                    f" ms p99, throughput x{extra['tput_ratio']}",
                )
            row = res.add(
                "proxy", name + " (1 conn)", r1["rps"], r1["p50_ms"], r1["p99_ms"], **extra
            )
            if base:
                shares.append((name, extra["tput_ratio"] or 0.0, rn["rps"], bn["rps"], row))
                ones.append((name, extra["tput_ratio_1conn"] or 0.0, r1, b1, row))
        # issue #12: throughput at 8 connections as a share of the direct call's
        res.goal(
            "proxy",
            "; ".join(
                f"{name.split(' -> ')[1]}: {share:.0%} ({via:,.0f} vs {direct:,.0f} "
                "calls/s, 8 conns)"
                for name, share, via, direct, _ in shares
            ),
            all(share >= 0.6 for _, share, _, _, _ in shares),
        )
        for _, share, _, _, row in shares:
            row["goal"] = f"{'MET' if share >= 0.6 else 'MISS'}: >= 60 %"
        # issue 23: the same at one keep-alive connection, where every call waits for
        # the explorer's work and the node's in turn; with the explorer's CPU per call
        # beside the node's, which is what a miss comes down to.
        res.goal(
            "proxy1",
            "; ".join(
                f"{name.split(' -> ')[1]}: {ratio:.2f} ({via['rps']:,.0f} vs "
                f"{direct['rps']:,.0f} calls/s; explorer {via['us_per_req']} us, node "
                f"{direct['us_per_req']} us of CPU per call)"
                for name, ratio, via, direct, _ in ones
            ),
            all(ratio >= 0.75 for _, ratio, _, _, _ in ones),
        )
        for _, ratio, _, _, row in ones:
            row["goal"] += f"; 1 conn {'MET' if ratio >= 0.75 else 'MISS'}: >= 0.75"
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
                        if (
                            rpc(exp.sock, "explorer.get_node", {"node_id": node_id})[
                                "status"
                            ]
                            == "online"
                        ):
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
            res.add(
                "failure",
                f"{how} -> offline (offline_after={after:g}s, interval 1s)",
                None,
                round(sorted(ok)[len(ok) // 2] * 1000, 1) if ok else None,
                round(max(ok) * 1000, 1) if ok else None,
                min_ms=round(min(ok) * 1000, 1) if ok else None,
                reps=len(times),
                undetected=len(times) - len(ok),
            )
        res.note(
            "failure rows: p50/p99 columns are the median/max detection time in ms "
            "over the repetitions (polling explorer.get_node every 50 ms)"
        )
    finally:
        procs.stop(exp)
