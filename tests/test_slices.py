"""in_slices: a long scan, one slice per reactor turn."""

from twisted.internet.task import Clock

from hero_compute.rpc.slices import in_slices

from .support import failure_result_of, success_result_of


def test_small_scan_is_done_at_once():
    """At most one slice: done during the call, no timer."""
    clock, seen = Clock(), []
    assert in_slices(clock, list(range(5)), seen.extend, size=5) is None
    assert seen == [0, 1, 2, 3, 4]
    assert clock.getDelayedCalls() == []


class Turns:
    """A reactor's turns, one at a time: what ``callLater(0)`` asked for runs only at
    :meth:`turn` (Twisted's reactor runs a call made during a turn at the next one)."""

    def __init__(self):
        self.waiting = []

    def callLater(self, delay, f, *args):
        assert delay == 0
        self.waiting.append((f, args))

    def turn(self):
        now, self.waiting = self.waiting, []
        for f, args in now:
            f(*args)


def test_long_scan_takes_one_slice_per_turn():
    """Each further slice waits for a turn of the reactor; all in order; the Deferred
    fires after the last."""
    turns, seen = Turns(), []
    d = in_slices(turns, list(range(10)), lambda s: seen.append(list(s)), size=4)
    assert seen == [[0, 1, 2, 3]] and not d.called
    turns.turn()
    assert seen[-1] == [4, 5, 6, 7] and not d.called
    turns.turn()
    assert seen[-1] == [8, 9]
    assert success_result_of(d) is None
    assert turns.waiting == []


def test_a_failing_slice_stops_the_scan():
    """What a slice raises fails the Deferred, and no slice follows."""
    clock, seen = Clock(), []

    def step(items):
        seen.append(items[0])
        if items[0] == 3:
            raise ValueError("no")

    d = in_slices(clock, list(range(9)), step, size=3)
    clock.advance(0)
    failure_result_of(d, ValueError)
    clock.advance(0)
    assert seen == [0, 3] and clock.getDelayedCalls() == []
