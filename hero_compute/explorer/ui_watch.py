"""
An event reader's explorer connection, watched while the dashboard's browser side is
full (:mod:`.ui_console`): a stream the explorer closed (a reader fallen behind) would
otherwise go unseen, and what is held for the browser kept for ever.
"""

from __future__ import annotations

import select
from typing import Any

#: Seconds between looks at an event stream's explorer connection while it is not read.
WATCH = 1.0


class Watched:
    """The explorer's connection as an event reader's producer.  Unread while the browser
    takes nothing, its end (the explorer closing a reader that fell behind) would go
    unseen, and what is held for the browser kept: while paused it is looked at every
    :data:`WATCH` seconds, and once the explorer has hung up both connections are cut."""

    def __init__(self, explorer: Any, browser: Any, clock: Any) -> None:
        self._explorer, self._browser, self._clock = explorer, browser, clock
        self._look_later: Any = None

    def pauseProducing(self) -> None:
        self._explorer.pauseProducing()
        if self._look_later is None:
            self._look_later = self._clock.callLater(WATCH, self._look)

    def resumeProducing(self) -> None:
        self._unwatch()
        self._explorer.resumeProducing()

    def stopProducing(self) -> None:
        self._unwatch()
        self._explorer.stopProducing()

    def _unwatch(self) -> None:
        if self._look_later is not None and self._look_later.active():
            self._look_later.cancel()
        self._look_later = None

    def _look(self) -> None:
        self._look_later = None
        fd = self._explorer.fileno()
        if fd < 0:
            # The explorer's side is gone already: the browser's cannot drain, cut it.
            self._browser.abortConnection()
            return
        poll = select.poll()
        poll.register(fd, select.POLLRDHUP)
        if poll.poll(0):
            self._browser.abortConnection()
            self._explorer.abortConnection()
            return
        self._look_later = self._clock.callLater(WATCH, self._look)
