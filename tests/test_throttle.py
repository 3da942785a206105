"""
The one rate-limited log rule (hero_compute.rpc.throttle) on a fake clock: the first
line at once, a burst per window opened by its first line, the rest counted and handed
back as "and N more" or as a summary, keys apart.
"""

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent

from hero_compute.rpc.throttle import Throttle, log_refusal


def test_first_line_is_written_then_one_per_window():
    """The first occurrence is let through at once; the next ones within the window are
    held and counted into the first line after it."""
    clock = Clock()
    clock.advance(1000)
    throttle = Throttle(clock, 10.0)
    assert throttle.offer() == 0
    assert [throttle.offer() for _ in range(3)] == [None, None, None]
    assert throttle.held() == 3
    clock.advance(9.99)
    assert throttle.offer() is None
    clock.advance(0.01)
    assert throttle.offer() == 4  # "and 4 more since the last such line"
    assert throttle.held() == 0


def test_window_opens_at_its_first_line_not_on_a_grid():
    """A window runs from its first line: lines at 0.9 s and 1.1 s are one window, not
    two calendar seconds."""
    clock = Clock()
    throttle = Throttle(clock, 1.0, burst=2)
    clock.advance(0.9)
    assert throttle.offer() == 0 and throttle.offer() == 0
    clock.advance(0.2)
    assert throttle.offer() is None
    clock.advance(0.8)
    assert throttle.offer() == 1


def test_burst_lines_per_window_and_ready():
    """``burst`` lines go through per window; ready() says whether one more would,
    without counting anything."""
    clock = Clock()
    throttle = Throttle(clock, 1.0, burst=3)
    assert throttle.ready()
    assert [throttle.offer() for _ in range(5)] == [0, 0, 0, None, None]
    assert not throttle.ready()
    assert throttle.held() == 2
    clock.advance(1.0)
    assert throttle.ready() and throttle.held() == 2


def test_flush_is_a_line_of_the_next_window():
    """flush() sums up the held ones once the window is over, and that summary is the
    first line of the next window (so burst 1 stays one line per period)."""
    clock = Clock()
    throttle = Throttle(clock, 10.0)
    throttle.offer()
    throttle.offer()
    throttle.offer()
    assert throttle.flush() == 0  # the window is not over: nothing to write yet
    clock.advance(10)
    assert throttle.flush() == 2
    assert throttle.flush() == 0  # nothing held any more
    assert throttle.offer() is None  # the summary used the new window's line
    clock.advance(10)
    assert throttle.offer() == 1


def test_take_empties_whatever_the_window():
    """take() hands back the held count at once (a stop, or a summary outside the
    budget) and leaves the window as it was."""
    clock = Clock()
    throttle = Throttle(clock, 10.0)
    throttle.offer()
    throttle.offer()
    assert throttle.take() == 1
    assert throttle.take() == 0
    assert throttle.offer() is None  # still the same window


def test_keys_are_counted_apart():
    """Each key has its own window and count: a flood of one refusal does not silence
    another."""
    clock = Clock()
    throttle = Throttle(clock, 10.0)
    assert throttle.offer("max_conns_per_addr") == 0
    assert throttle.offer("max_conns_per_addr") is None
    assert throttle.offer("fd_reserve") == 0
    assert throttle.held("max_conns_per_addr") == 1
    assert throttle.held("fd_reserve") == 0
    assert throttle.held("head_timeout") == 0 and throttle.take("head_timeout") == 0
    assert throttle.flush("head_timeout") == 0


def test_refusal_lines_say_the_limit_and_how_many_more():
    """log_refusal writes ``refused (<limit>) ...`` at once, holds the next ones of that
    limit within the window, says their count in the next line, and keeps limits apart;
    the limit's name is in the event's format (the kind of line is known from it)."""
    clock = Clock()
    throttle = Throttle(clock, 10.0)
    logger = Logger()
    with capturedLogs() as events:
        log_refusal(logger, throttle, "max_batch", "a batch of {count}", count=4)
        for _ in range(3):
            log_refusal(logger, throttle, "max_batch", "a batch of {count}", count=5)
        log_refusal(logger, throttle, "max_response", "a response")
        clock.advance(10)
        log_refusal(logger, throttle, "max_batch", "a batch of {count}", count=6)
    assert [formatEvent(e) for e in events] == [
        "refused (max_batch) a batch of 4",
        "refused (max_response) a response",
        "refused (max_batch) a batch of 6 (and 3 more since the last such line)",
    ]
    assert all(e["log_level"] == LogLevel.warn for e in events)
    assert "max_batch" in events[0]["log_format"]
