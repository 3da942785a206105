"""
Results of a benchmark run: rows, targets and notes as they are collected, the machine
description, and the table (stdout) and Markdown renderings.
"""

import platform
import resource
import subprocess

from procs import ENV, NCPU, PY, ROOT, log

#: Issue 23's performance goals ("Performance round three"), in its table's order:
#: key -> (measure, goal), formatted with what the run measured (``n``, ``rate``, ...);
#: :data:`GOAL_DEFAULTS` are a full run's, for the goals not run.
ROUND_THREE = {
    "tls": (
        "TLS / plain TCP, explorer CPU per heartbeat, same offered rate, one "
        "certificate per node",
        "<= 1.10x",
    ),
    "proxy1": (
        "`explorer.call node.info` throughput / direct, one keep-alive connection",
        ">= 0.75",
    ),
    "ingest_full": (
        "saturating ingest, full heartbeats, N = {n:,} ids, one core",
        ">= 15,000/s answered",
    ),
    "tls_ingest": (
        "ingest, N = {n:,} nodes over mutual TLS, delta heartbeats",
        ">= 10,000/s with p99 < 20 ms",
    ),
    "place": (
        "`explorer.place` p99 at N = {n:,} under {rate:,.0f} heartbeats/s",
        "p99 < 5 ms, and the ingest p99 still < 20 ms",
    ),
    "boot": (
        "boot to SSH through the node / plain QEMU, same guest and seed (TCG)",
        "<= {goal:g}x",
    ),
    "console": ("console echo round trip, added by the explorer", "< 2 ms (median)"),
    "store": (
        "explorer CPU per heartbeat with PostgreSQL as the store / with SQLite",
        "<= 1.10x",
    ),
}
#: Issue #12's goals ("Performance round two"), rerun in the same run since round three
#: must not make anything else slower.  ``tls`` is in both rounds, with two goals.
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
}
#: Each round's table: (number, title, goals), the newest first.
ROUNDS = (
    (3, "issue 23 goals (round three)", ROUND_THREE),
    (2, "issue #12 goals (round two, rerun)", ROUND_TWO),
)
GOAL_DEFAULTS = {"n": 100_000, "rate": 10_000, "interval": 10, "limit": 15}
GOAL_DEFAULTS_BY_KEY = {
    "restart": {"n": 50_000},
    "place": {"rate": 5000},
    "boot": {"goal": 1.25},
}


def _goal_text(goals, key, **fmt):
    values = {**GOAL_DEFAULTS, **GOAL_DEFAULTS_BY_KEY.get(key, {}), **fmt}
    measure, goal = goals[key]
    return measure.format(**values), goal.format(**values)


class Results:
    def __init__(self):
        self.rows = []
        self.notes = []
        self.targets = []
        #: Goals met or missed: one per key and round (:data:`ROUNDS`) it is in.
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
        A goal of each round whose table has ``key`` (:data:`ROUNDS`), beside its row.

        :param result: what was measured, in words
        :param met: True or False, or None where it could not be measured (n/a); a
            dict ``{round: met}`` where the rounds set the same measure different goals
            (``tls``)
        :param row: the row it is about (:meth:`add`'s), which shows it
        :param fmt: the run's ``n``, ``rate``, ... for the goal's text
        """
        verdicts = []
        for rnd, _, goals in ROUNDS:
            if key not in goals:
                continue
            measure, goal = _goal_text(goals, key, **fmt)
            m = met.get(rnd) if isinstance(met, dict) else met
            m = None if m is None else bool(m)
            self.goals.append(
                {
                    "key": key,
                    "round": rnd,
                    "measure": measure,
                    "goal": goal,
                    "result": result,
                    "met": m,
                }
            )
            verdicts.append(f"{_verdict(m)}: {goal}" + (" (r2)" if rnd == 2 else ""))
            log(f"goal {key} (round {rnd}): {_verdict(m)} ({goal}): {result}")
        if not verdicts:
            raise KeyError(f"no round has a goal {key!r}")
        if row is not None:
            row["goal"] = "; ".join(verdicts)

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


def goals_table(results, rnd, goals):
    """
    One round's goals as a Markdown table for the README, in its table's order; a goal
    whose section did not run says so.
    """
    got = {g["key"]: g for g in results.goals if g["round"] == rnd}
    md = ["| measure | goal | result | |", "|---|---|---|---|"]
    for key in goals:
        g = got.get(key)
        if g is None:
            measure, goal = _goal_text(goals, key)
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
    for rnd, title, goals in ROUNDS:
        got = {g["key"]: g for g in results.goals if g["round"] == rnd}
        if not got:
            continue
        text.append(f"{title}:")
        for key in goals:
            g = got.get(key)
            if g is None:
                text.append(f"[-   ] {_goal_text(goals, key)[0]}: not run")
                continue
            text.append(
                f"[{_verdict(g['met']):4}] {g['measure']}: {g['goal']}\n"
                f"         {g['result']}"
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
    ]
    for rnd, title, goals in ROUNDS:
        md += [f"**{title[0].upper()}{title[1:]}** (README-ready):", ""]
        md += goals_table(results, rnd, goals) + [""]
    md += [
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
