"""
The ``profile`` section: a py-spy profile of the explorer under the ingest load, and
its summary by category (what share of the explorer's time goes where).
"""

import os
import re
from collections import Counter

from ingest import _ingest_one
from loadrun import run_closed
from procs import CLIENT_CPU, HERE, PYSPY, start_explorer


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
        spy = procs.start(
            [
                PYSPY,
                "record",
                "-p",
                str(exp.pid),
                "-r",
                "250",
                "-f",
                "raw",
                "-o",
                raw_floor,
                "-d",
                str(int(cfg["dur"] + 1)),
            ],
            "py-spy",
            cpus=CLIENT_CPU,
        )
        r = run_closed(procs, exp.sock, cfg["conns"], cfg["dur"], 1.0)
        spy.wait(30)
        procs.procs.remove(spy)
        res.add(
            "profile",
            "explorer.info unix keep-alive under py-spy",
            r["rps"],
            r["p50_ms"],
            r["p99_ms"],
        )
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
    (
        "syscalls: recv/send/epoll (sendmsg, untilConcludes, doPoll, _add/_remove, doRead)",
        r"sendmsg\.py|untilConcludes|doPoll|EPollReactor\._(add|remove)|Connection\.doRead|"
        r"writeSomeData|_getsockname|getHost",
    ),
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
    skip = (
        "<module>",
        "run (",
        "mainLoop",
        "runApp",
        "startReactor",
        "postApplication",
        "runReactorWithLogging",
        "ApplicationRunner.run",
        "ReactorBase.run",
    )
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
