"""
How many new node ids each source address registered lately: the count behind
``EXPLORER_NEW_NODES_PER_ADDR`` (CONTRACT §7), on the explorer's injected clock.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime


class NewIds:
    """
    New node ids per source address in the last ``window`` seconds of an injected clock
    (a count per calendar minute let a flood place the limit twice in a second).

    :param clock: an ``IReactorTime``
    :param window: seconds a new id counts against its source
    """

    def __init__(self, clock: IReactorTime, window: float = 60.0) -> None:
        self._clock = clock
        self._window = window
        self._seen: dict[str, collections.deque[float]] = {}
        self._sweep_at = clock.seconds() + window

    def count(self, host: str) -> int:
        """:return: the new ids ``host`` registered within the window"""
        now = self._clock.seconds()
        horizon = now - self._window
        if now >= self._sweep_at:
            # Sources gone quiet are dropped once per window: many addresses, each
            # seen once, cannot make this grow without bound.
            self._sweep_at = now + self._window
            self._seen = {h: t for h, t in self._seen.items() if t[-1] > horizon}
        times = self._seen.get(host)
        if times is None:
            return 0
        while times and times[0] <= horizon:
            times.popleft()
        return len(times)

    def add(self, host: str) -> None:
        """Count one new id from ``host``, now."""
        self._seen.setdefault(host, collections.deque()).append(self._clock.seconds())
