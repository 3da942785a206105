"""
Results of a benchmark run: rows, targets and notes as they are collected, the machine
description, and the table (stdout) and Markdown renderings.
"""

import platform
import resource
import subprocess

from procs import ENV, NCPU, PY, ROOT, log

#: Issue #12's performance goals ("Performance round two"), in the README's order:
#: key -> (measure, goal), formatted with what the run measured (``n``, ``rate``,
#: ``interval``); :data:`GOAL_DEFAULTS` are a full run's, for the goals not run.
ROUND_TWO = {
    "ingest": (
        "heartbeat ingest, N = {n:,} nodes at a {interval:g} s interval",
        ">= {rate:,.0f}/s sustained, p99 < 20 ms, no node wrongly offline, "
        "<= 2 kB RSS per node",
    ),
    "restart": (
        "explorer restart with N = {n:,} nodes connected",
        "every node `online` again within one interval + 5 s ({limit:g} s); no reactor "
        "pause > 200 ms during the re-registration, none > 50 ms in steady state",
    ),
    "query": (
        "`explorer.query_nodes` page of 1,000 at N = {n:,}",
        "p99 < 20 ms while ingest runs",
    ),
    "proxy": ("`explorer.call` throughput as a share of a direct call", ">= 60 %"),
    "transport": ("native TCP / socat, keep-alive, wrk", ">= 1.2"),
    "tls": ("TLS heartbeat CPU per heartbeat vs plain TCP", "<= 1.3x"),
    # Issue 20's.
    "place": (
        "`explorer.place` at N = {n:,} while heartbeats arrive at {rate:,.0f}/s",
        "p99 < 5 ms, and the ingest p99 still < 20 ms",
    ),
    # Issues 19 and 23's.
    "boot": (
        "boot to SSH through the node / plain QEMU, same guest and seed (TCG)",
        "<= {goal:g}x",
    ),
}
GOAL_DEFAULTS = {"n": 100_000, "rate": 10_000, "interval": 10, "limit": 15}
GOAL_DEFAULTS_BY_KEY = {
    "restart": {"n": 50_000},
    "place": {"rate": 5000},
    "boot": {"goal": 1.25},
}

# Issue 23's TLS ingest row (a hunk of its own: other round-three goals come apart).
ROUND_TWO["tls_ingest"] = (
    "heartbeat ingest over mutual TLS, N = {n:,} nodes (one certificate and "
    "connection each), delta heartbeats at a {interval:g} s interval",
    ">= {rate:,.0f}/s, p99 < 20 ms, no node wrongly offline",
)


def _goal_text(key, **fmt):
    values = {**GOAL_DEFAULTS, **GOAL_DEFAULTS_BY_KEY.get(key, {}), **fmt}
    measure, goal = ROUND_TWO[key]
    return measure.format(**values), goal.format(**values)


class Results:
    def __init__(self):
        self.rows = []
        self.notes = []
        self.targets = []
        #: Issue #12's goals met or missed, one per :data:`ROUND_TWO` key.
        self.goals = []

    def add(self, section, case, tput=None, p50=None, p99=None, **extra):
        row = {
            "section": section,
            "case": case,
            "throughput": tput,
            "p50_ms": p50,
            "p99_ms": p99,
            "extra": extra,
        }
        self.rows.append(row)
        log(
            f"{section:9} {case:42} {_f(tput):>10} {_f(p50):>8} {_f(p99):>8} "
            + " ".join(f"{k}={_f(v)}" for k, v in extra.items())
        )
        return row

    def target(self, name, met, detail):
        self.targets.append({"target": name, "met": bool(met), "detail": detail})

    def goal(self, key, result, met, row=None, **fmt):
        """
        One of issue #12's goals (:data:`ROUND_TWO`), beside its row.

        :param result: what was measured, in words
        :param met: True or False, or None where it could not be measured (n/a)
        :param row: the row it is about (:meth:`add`'s), which shows it
        :param fmt: the run's ``n``, ``rate``, ... for the goal's text
        """
        measure, goal = _goal_text(key, **fmt)
        met = None if met is None else bool(met)
        self.goals.append(
            {"key": key, "measure": measure, "goal": goal, "result": result, "met": met}
        )
        if row is not None:
            row["goal"] = f"{_verdict(met)}: {goal}"
        log(f"goal {key}: {_verdict(met)} ({goal}): {result}")

    def note(self, text):
        self.notes.append(text)


def _verdict(met):
    return "n/a" if met is None else "MET" if met else "MISS"


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
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "hero_compute"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
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
    tw = subprocess.run(
        [PY, "-c", "import twisted; print(twisted.__version__)"],
        capture_output=True,
        text=True,
        env=ENV,
    ).stdout.strip()
    pyv = subprocess.run(
        [PY, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "cpu": model,
        "cores": NCPU,
        "python": pyv,
        "twisted": tw,
        "commit": git_rev(),
        "kernel": platform.release(),
        "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


def goals_table(results):
    """
    Issue #12's goals as a Markdown table for the README, in :data:`ROUND_TWO`'s
    order; a goal whose section did not run says so.
    """
    got = {g["key"]: g for g in results.goals}
    md = ["| measure | goal | result | |", "|---|---|---|---|"]
    for key in ROUND_TWO:
        g = got.get(key)
        if g is None:
            measure, goal = _goal_text(key)
            md.append(f"| {measure} | {goal} | not run | |")
        else:
            md.append(
                f"| {g['measure']} | {g['goal']} | {g['result']} | {_verdict(g['met'])} |"
            )
    return md


def render(results, mach, args):
    head = ["section", "case", "throughput", "p50 ms", "p99 ms", "goal", "details"]
    rows = []
    for r in results.rows:
        rows.append(
            [
                r["section"],
                r["case"],
                _f(r["throughput"]),
                _f(r["p50_ms"]),
                _f(r["p99_ms"]),
                r.get("goal", ""),
                " ".join(f"{k}={_f(v)}" for k, v in r["extra"].items()),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = "  ".join("-" * w for w in widths)

    def fmt(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))

    text = (
        [
            f"machine: {mach['cpu']}, {mach['cores']} cores, Python {mach['python']}, "
            f"Twisted {mach['twisted']}, Linux {mach['kernel']}, "
            f"RLIMIT_NOFILE hard {mach['nofile_hard']}, commit {mach['commit']}",
            f"mode: {'quick' if args.quick else 'full'}; "
            f"sections: {','.join(args.sections)}",
            "",
            line,
            fmt(head),
            line,
        ]
        + [fmt(r) for r in rows]
        + [line, ""]
    )
    if results.goals:
        text.append("issue #12 goals:")
    for g in results.goals:
        text.append(
            f"[{_verdict(g['met']):4}] {g['measure']}: {g['goal']}\n         {g['result']}"
        )
    if results.targets:
        text.append("other targets:")
    for t in results.targets:
        text.append(f"[{'MET ' if t['met'] else 'MISS'}] {t['target']}: {t['detail']}")
    if results.notes:
        text.append("")
        text += [f"note: {n}" for n in results.notes]
    md = [
        f"**machine**: {mach['cpu']}, {mach['cores']} cores, Python {mach['python']}, "
        f"Twisted {mach['twisted']}, Linux {mach['kernel']}, commit {mach['commit']}"
        f"{' (quick run)' if args.quick else ''}",
        "",
        "**Issue #12 goals** (README-ready):",
        "",
        *goals_table(results),
        "",
        "**All rows:**",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    md += [""] + [
        f"- {'MET' if t['met'] else 'MISSED'}: {t['target']}: {t['detail']}"
        for t in results.targets
    ]
    md += [""] + [f"- note: {n}" for n in results.notes]
    return "\n".join(text), "\n".join(md) + "\n"
