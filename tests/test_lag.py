"""
The reactor lag monitor on a fake clock: lateness measured from when a tick was due,
pauses logged at most once per period with the rest summed up, a clean stop.
"""

import time

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from hero_compute.rpc.lag import LAG_BUCKETS, ReactorLag


def pauses(events):
    """The messages of the pause log lines among captured events."""
    return [formatEvent(e) for e in events if "reactor paused" in e.get("log_format", "")]


def on_time(clock, ticks):
    """Advance ``clock`` to the due time of the next timer, exactly, ``ticks`` times."""
    for _ in range(ticks):
        (call,) = clock.getDelayedCalls()
        clock.advance(call.getTime() - clock.seconds())


def started(clock, **kw):
    """A started :class:`ReactorLag` on ``clock``."""
    lag = ReactorLag(clock, **kw)
    lag.startService()
    clock.advance(0)  # the reactor runs
    return lag


def test_on_time_ticks_are_no_lag():
    """Ticks run when due are measured as no lag, every one counted."""
    clock = Clock()
    lag = started(clock)
    on_time(clock, 50)
    assert lag.histogram.counts[0] == sum(lag.histogram.counts) == 50
    assert lag.histogram.sum == pytest.approx(0.0, abs=1e-9)
    lag.stopService()


def test_a_late_tick_is_measured_from_when_it_was_due():
    """A tick that runs 0.31 s after it was due is one 0.31 s lag, not 15 missed ticks."""
    clock = Clock()
    lag = started(clock)
    on_time(clock, 1)
    with capturedLogs() as events:
        clock.advance(0.33)
    assert lag.last == pytest.approx(0.31)
    assert sum(lag.histogram.counts) == 2
    assert lag.histogram.sum == pytest.approx(0.31)
    assert pauses(events) == [
        "reactor paused 0.31 s: every timer, connection and request waited that long"
    ]
    # The next tick is due 20 ms after the late one ran, and is on time.
    on_time(clock, 1)
    assert lag.last == pytest.approx(0.0, abs=1e-9)
    lag.stopService()


def test_start_up_is_not_a_pause():
    """The first tick is due 20 ms after the reactor runs, not after startService."""
    clock = Clock()
    lag = ReactorLag(clock)
    lag.startService()
    clock.advance(1.5)  # the rest of start-up, then the reactor runs
    on_time(clock, 1)
    assert lag.last == 0.0 and sum(lag.histogram.counts) == 1
    lag.stopService()


def test_lag_below_the_pause_threshold_is_not_logged():
    """A 0.15 s lag is measured but not logged."""
    clock = Clock()
    lag = started(clock)
    with capturedLogs() as events:
        clock.advance(0.17)
    assert lag.last == pytest.approx(0.15)
    assert pauses(events) == []
    lag.stopService()


def test_pauses_are_logged_once_per_period_and_summed():
    """
    A pause after 10 quiet seconds is logged at once; pauses within 10 s of a line are
    held and summed up in one line at the first tick after those 10 s.
    """
    clock = Clock()
    lag = started(clock)
    with capturedLogs() as events:
        clock.advance(0.52)  # due at 0.02: a 0.5 s pause, logged
        for _ in range(3):  # three 0.3 s pauses within the 10 s, held
            on_time(clock, 50)
            clock.advance(0.32)
        assert len(pauses(events)) == 1
        on_time(clock, 500)  # past 10 s: the held ones summed up
        assert len(pauses(events)) == 2
        clock.advance(0.42)  # within 10 s of the summary: held
        assert len(pauses(events)) == 2
        on_time(clock, 500)  # logged alone after the 10 s
        assert len(pauses(events)) == 3
        on_time(clock, 500)
        clock.advance(0.27)  # after 10 quiet seconds: logged at once
    lines = pauses(events)
    assert lines[0].startswith("reactor paused 0.50 s")
    assert lines[1].startswith("reactor paused 3 times in the last ")
    assert "0.90 s in all, the longest 0.30 s" in lines[1]
    assert lines[2].startswith("reactor paused 0.40 s:")
    assert lines[3].startswith("reactor paused 0.25 s:")
    assert len(lines) == 4
    lag.stopService()


def test_stop_logs_held_pauses_and_leaves_no_timer():
    """Stopping cancels the timer and logs what was held; a stopped monitor is idle."""
    clock = Clock()
    lag = started(clock)
    with capturedLogs() as events:
        clock.advance(0.32)
        clock.advance(0.32)
        lag.stopService()
    assert not clock.getDelayedCalls()
    assert not lag.running
    assert len(pauses(events)) == 2
    count = sum(lag.histogram.counts)
    clock.advance(1.0)
    assert sum(lag.histogram.counts) == count


def test_exported_histogram_has_the_fixed_buckets():
    """``hero_reactor_lag_seconds`` has (at least) the buckets the bench reads."""
    clock = Clock()
    lag = started(clock)
    clock.advance(0.02)
    clock.advance(0.1)  # 0.08 s late
    registry = CollectorRegistry()
    registry.register(lag)
    for le in ("0.005", "0.01", "0.025", "0.05", "0.1", "0.2", "0.5", "1.0", "2.0"):
        bucket = registry.get_sample_value("hero_reactor_lag_seconds_bucket", {"le": le})
        assert bucket is not None, le
    assert {0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5} <= set(LAG_BUCKETS)
    sample = registry.get_sample_value
    assert sample("hero_reactor_lag_seconds_bucket", {"le": "0.05"}) == 1
    assert sample("hero_reactor_lag_seconds_bucket", {"le": "0.1"}) == 2
    assert sample("hero_reactor_lag_seconds_count") == 2
    assert sample("hero_reactor_lag_last_seconds") == pytest.approx(0.08)
    lag.stopService()


def test_a_tick_is_cheap():
    """Fifty ticks a second cost well under 0.1 % of a core (a tick < 20 us)."""
    clock = Clock()
    lag = started(clock)
    n = 20000
    steps = [0.02] * n
    # This process's CPU time, not the wall clock: the claim is a cost, and on a loaded
    # machine the wall clock also counts the time others had the core (5-8 us a tick
    # at a load average of 9, against 20 us; more load would have failed it).
    begin = time.process_time()
    clock.pump(steps)
    per_tick = (time.process_time() - begin) / n
    lag.stopService()
    # Clock.advance itself is most of this; a tick under the real reactor is ~3 us.
    assert per_tick < 20e-6, per_tick
