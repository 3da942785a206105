"""
Where an explorer's reactor stalls (``bench/run.py --trace DIR``): loaded through
``PYTHONPATH`` into every process a benchmark starts, it acts only in ``twistd ...
explorer`` and only with ``BENCH_TRACE`` set to a directory.  Each reactor event longer
than ``BENCH_TRACE_MS`` (default 2) milliseconds of wall time becomes one line of
``$BENCH_TRACE/explorer-<pid>.txt``: a collection of the cycle collector (by
generation), one socket's read or write (by protocol class), or a turn's timers; with
the wall time and the thread's CPU time, so that what the code cost and what the
machine added (the process waiting for a core) are told apart.  ``summary(path)``
sums a file up.  A benchmark aid only: nothing of hero_compute imports it.
"""

import os
import sys


def _install(directory, limit):
    import gc
    import time

    from twisted.internet import base, epollreactor

    out = open(os.path.join(directory, f"explorer-{os.getpid()}.txt"), "w", buffering=1)
    wall, cpu = time.perf_counter, time.thread_time
    started = {}

    def line(kind, w, c, what=""):
        out.write(f"{time.time():.3f} {kind} {w * 1e3:.2f} {c * 1e3:.2f} {what}\n")

    def collected(phase, info):
        if phase == "start":
            started["gc"] = (wall(), cpu())
        elif "gc" in started:
            w0, c0 = started.pop("gc")
            if wall() - w0 > limit:
                line(f"gc{info['generation']}", wall() - w0, cpu() - c0)

    gc.callbacks.append(collected)
    io = epollreactor.EPollReactor._doReadOrWrite

    def traced_io(self, selectable, fd, event):
        w0, c0 = wall(), cpu()
        try:
            return io(self, selectable, fd, event)
        finally:
            if wall() - w0 > limit:
                what = type(getattr(selectable, "protocol", selectable)).__name__
                line("io", wall() - w0, cpu() - c0, what)

    epollreactor.EPollReactor._doReadOrWrite = traced_io
    timers = base.ReactorBase.runUntilCurrent

    def traced_timers(self):
        w0, c0 = wall(), cpu()
        try:
            return timers(self)
        finally:
            if wall() - w0 > limit:
                line("timers", wall() - w0, cpu() - c0)

    base.ReactorBase.runUntilCurrent = traced_timers


def summary(path, since=0.0, until=float("inf")):
    """
    :return: ``{kind: (events, wall ms, cpu ms, longest wall ms)}`` of a trace file's
        events between two Unix times
    """
    sums = {}
    with open(path) as f:
        for text in f:
            at, kind, w, c, *_ = text.split()
            if since <= float(at) < until:
                n, tw, tc, top = sums.get(kind, (0, 0.0, 0.0, 0.0))
                sums[kind] = (n + 1, tw + float(w), tc + float(c), max(top, float(w)))
    return sums


if (
    os.environ.get("BENCH_TRACE")
    and sys.argv[:1]
    and "twistd" in sys.argv[0]
    and "explorer" in sys.argv
):
    _install(os.environ["BENCH_TRACE"], float(os.environ.get("BENCH_TRACE_MS", "2")) / 1e3)
