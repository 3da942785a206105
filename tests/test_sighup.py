"""
The one SIGHUP reload (rpc/sighup.py): handed to the reactor thread, its outcome
logged, the previous handler restored at stop.
"""

import os
import signal

from twisted.logger import capturedLogs, formatEvent

from hero_compute.rpc.sighup import HangupReload


class _Reactor:
    """Records what the signal handler hands to the reactor thread."""

    def __init__(self):
        self.handed = []

    def callFromThread(self, f, *args):
        self.handed.append((f, args))


def test_sighup_reload_runs_in_the_reactor_and_restores_the_handler():
    """A SIGHUP only hands the reload to the reactor; it runs there and is logged; at
    restore the handler from before is back."""
    before = []
    previous = signal.signal(signal.SIGHUP, lambda *_: before.append(1))
    try:
        reactor, done = _Reactor(), []
        hangup = HangupReload(
            reactor, lambda: done.append(1) or "material reloaded", (ValueError,), "it"
        )
        hangup.install()
        os.kill(os.getpid(), signal.SIGHUP)
        assert done == [] and len(reactor.handed) == 1
        with capturedLogs() as events:
            reactor.handed[0][0]()
        assert done == [1]
        assert [formatEvent(e) for e in events] == ["SIGHUP: material reloaded"]
        hangup.restore()
        os.kill(os.getpid(), signal.SIGHUP)
        assert before == [1] and len(reactor.handed) == 1
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_sighup_reload_that_fails_keeps_going_and_warns():
    """A reload that raises one of its errors is a warning naming why; nothing raises."""

    def reload():
        raise ValueError("the key does not match")

    hangup = HangupReload(_Reactor(), reload, (ValueError,), "TLS material")
    with capturedLogs() as events:
        hangup.run()
    [event] = events
    assert formatEvent(event) == (
        "SIGHUP: TLS material not reloaded, the previous stays in use: "
        "the key does not match"
    )
    assert event["log_level"].name == "warn"
