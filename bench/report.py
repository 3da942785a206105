"""
Results of a benchmark run: rows, targets and notes as they are collected, the machine
description, and the table (stdout) and Markdown renderings.
"""

import platform
import resource
import subprocess

from procs import ENV, NCPU, PY, ROOT, log


class Results:
    def __init__(self):
        self.rows = []
        self.notes = []
        self.targets = []

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


def render(results, mach, args):
    head = ["section", "case", "throughput", "p50 ms", "p99 ms", "details"]
    rows = []
    for r in results.rows:
        rows.append(
            [
                r["section"],
                r["case"],
                _f(r["throughput"]),
                _f(r["p50_ms"]),
                _f(r["p99_ms"]),
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
    for t in results.targets:
        text.append(f"[{'MET ' if t['met'] else 'MISS'}] {t['target']}: {t['detail']}")
    if results.notes:
        text.append("")
        text += [f"note: {n}" for n in results.notes]
    md = [
        f"**machine**: {mach['cpu']}, {mach['cores']} cores, Python {mach['python']}, "
        f"Twisted {mach['twisted']}, Linux {mach['kernel']}, commit {mach['commit']}",
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
