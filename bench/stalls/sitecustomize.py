"""
Where an explorer's reactor stalls (``bench/run.py --trace DIR``): loaded through
``PYTHONPATH`` into every process a benchmark starts, it acts only in ``twistd ...
explorer`` and only with ``BENCH_TRACE`` set to a directory.  Each reactor event longer
than ``BENCH_TRACE_MS`` (default 2) milliseconds of wall time becomes one line of
``$BENCH_TRACE/explorer-<pid>.txt``: a collection of the cycle collector (by
generation), one socket's read or write (by protocol class), or a turn's timers; with
the wall time and the thread's CPU time, so that what the code cost and what the
machine added (the process waiting for a core) are told apart, and what ran in it: the
JSON-RPC methods a read dispatched, the timed calls of a turn that took over half a
millisecond (``name:wall ms``).  ``summary(path)`` sums a file up.  A benchmark aid
only: nothing of hero_compute imports it.
"""

import os
import sys


def _install(directory, limit):
    import gc
    import time

    from twisted.internet import base, epollreactor, task

    from hero_compute.rpc import dispatch

    out = open(os.path.join(directory, f"explorer-{os.getpid()}.txt"), "w", buffering=1)
    wall, cpu = time.perf_counter, time.thread_time
    started = {}
    # What ran inside the event being timed: methods, and timed calls over 0.5 ms.
    inside = []

    handle = dispatch.Dispatcher._handle_one

    def traced_handle(self, message, context):
        if isinstance(message, dict):
            inside.append(str(message.get("method")))
        return handle(self, message, context)

    dispatch.Dispatcher._handle_one = traced_handle
    call_later = base.ReactorBase.callLater

    def traced_call_later(self, delay, f, *args, **kw):
        def timed(*a, **k):
            w0 = wall()
            try:
                return f(*a, **k)
            finally:
                if wall() - w0 > 0.0005:
                    # A LoopingCall's own __call__ says nothing: name what it loops.
                    g = f.f if isinstance(f, task.LoopingCall) else f
                    name = getattr(g, "__qualname__", None) or type(g).__name__
                    inside.append(f"{name}:{(wall() - w0) * 1e3:.1f}")

        return call_later(self, delay, timed, *args, **kw)

    base.ReactorBase.callLater = traced_call_later

    def what_ran():
        names = ",".join(inside[:12]) + (
            f",+{len(inside) - 12}" if len(inside) > 12 else ""
        )
        inside.clear()
        return names

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
        inside.clear()
        w0, c0 = wall(), cpu()
        try:
            return io(self, selectable, fd, event)
        finally:
            if wall() - w0 > limit:
                what = type(getattr(selectable, "protocol", selectable)).__name__
                line("io", wall() - w0, cpu() - c0, f"{what} {what_ran()}")

    epollreactor.EPollReactor._doReadOrWrite = traced_io
    timers = base.ReactorBase.runUntilCurrent

    def traced_timers(self):
        inside.clear()
        w0, c0 = wall(), cpu()
        try:
            return timers(self)
        finally:
            if wall() - w0 > limit:
                line("timers", wall() - w0, cpu() - c0, what_ran())

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
