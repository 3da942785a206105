"""
The placement section (issue 20): ``explorer.place`` called at a steady rate over the
explorer's Unix socket while a simulated fleet heartbeats it, so both the placement's
latency and the ingest's under it are measured.  A function ``(procs, tmp, res, cfg)``.
"""

import glob
import os

import loadcore
from ingest import _ingest_one
from loadrun import to_ms
from procs import ENV
from stalls.sitecustomize import summary

#: Heartbeats a second the fleet sends, whatever its size (issue 20's goal).
HB_RATE = 5000.0
#: explorer.place calls a second during the window.
PLACE_RATE = 20.0
#: What each call asks for: a small VM anywhere, spread.
REQUEST = {"vcpus": 1, "memory_mb": 1024, "disk_gb": 10}


def sec_place(procs, tmp, res, cfg):
    n = cfg["place_n"]
    interval = n / HB_RATE
    got = {}

    def row(res, out, n):
        h = {int(k): v for k, v in out["hist"].items()}
        got["p50"] = to_ms(loadcore.percentile(h, 0.5))
        got["p99"] = to_ms(loadcore.percentile(h, 0.99))
        got["out"] = out
        got["row"] = res.add(
            "place",
            f"explorer.place, unix, during ingest N={n:,} at {HB_RATE:,.0f}/s",
            out["ok"] / out["duration"] if out["duration"] else None,
            got["p50"],
            got["p99"],
            calls=out["ok"],
            max_ms=out["max_ms"],
            late=out["late"],
            err=out["errors"],
        )
        if out["error_samples"]:
            res.note(f"place: error samples {out['error_samples']}")
        if ENV.get("BENCH_TRACE") and out.get("start"):
            _trace_note(res, ENV["BENCH_TRACE"], out["start"], out["duration"])

    s, _, offline, _, _ = _ingest_one(
        procs,
        tmp,
        res,
        dict(cfg, hb_interval=interval),
        n,
        section="place-ingest",
        targets=False,
        caller=("explorer.place", REQUEST, PLACE_RATE, row),
    )
    out = got.get("out")
    place_p99, ingest_p99 = got.get("p99"), s["p99_ms"]
    res.goal(
        "place",
        f"place p99 {place_p99} ms (p50 {got.get('p50')}, max "
        f"{out and out['max_ms']}) over {out and out['ok']} calls; ingest p99 "
        f"{ingest_p99} ms at {s['rps']:,.0f}/s, {offline} wrongly offline",
        out is not None
        and out["ok"] > 0
        and not out["errors"]
        and place_p99 is not None
        and place_p99 < 5
        and ingest_p99 is not None
        and ingest_p99 < 20,
        row=got.get("row"),
        n=n,
        rate=HB_RATE,
    )


def _trace_note(res, directory, start, duration):
    """The explorer's reactor stalls during the window (``run.py --trace``)."""
    sums = {}
    for path in glob.glob(os.path.join(directory, "explorer-*.txt")):
        for kind, (n, wall, cpu, top) in summary(path, start, start + duration).items():
            old = sums.get(kind, (0, 0.0, 0.0, 0.0))
            sums[kind] = (old[0] + n, old[1] + wall, old[2] + cpu, max(old[3], top))
    res.note(
        f"place: explorer reactor events > 2 ms during the {duration:g} s window "
        "(kind: count, wall ms, of it CPU ms, longest wall ms): "
        + (
            "; ".join(
                f"{kind}: {n}, {wall:.0f}, {cpu:.0f}, {top:.1f}"
                for kind, (n, wall, cpu, top) in sorted(sums.items())
            )
            or "none"
        )
    )
