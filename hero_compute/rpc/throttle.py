"""
How often a kind of log line may be written, the one rule behind every rate-limited log
of the package (CONTRACT §7: each refusal is logged rate-limited): refusals at accept
(:mod:`~hero_compute.rpc.admission`), batches and responses over their limits
(:mod:`~hero_compute.rpc.dispatch`), proxied calls refused busy or answered too large
(:mod:`hero_compute.explorer.proxy`), the reactor's pauses (:mod:`~hero_compute.rpc.lag`)
and the explorer's node events (:mod:`hero_compute.explorer.registry`).

A :class:`Throttle` lets ``burst`` lines of one key through per window of ``every``
seconds on the injected clock; a window opens at its first line (not on a calendar
grid: two bursts astride a second boundary are still one window apart).  Occurrences
beyond the burst are held, that is counted, and the count is handed back with the next
line let through (``and N more``), or taken for a summary line of its own.  What those
lines say stays with the caller: a refusal, a pause's length, a node's name.
"""

from __future__ import annotations

from collections.abc import Hashable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: Seconds between two lines about refusals by one limit (CONTRACT §7), wherever it is
#: enforced: at accept, or a proxied call refused busy.
REFUSALS_EVERY = 10.0


def log_refusal(
    logger: Logger, throttle: Throttle, limit: str, what: str, **fields: object
) -> None:
    """
    One refusal by a limit, logged if ``throttle`` lets a line of ``limit`` through now,
    in the words of every refusal line: ``refused (<limit>) <what>``, and when some were
    held since the last such line, `` (and N more since the last such line)``.

    :param logger: the refusing module's logger
    :param throttle: the refusals' :class:`Throttle`, keyed by limit
    :param limit: the limit's name, as in metrics
    :param what: the rest of the line: a format string of ``fields``
    """
    more = throttle.offer(limit)
    if more is None:
        return
    # The limit's name is written into the format (it is one of ours, without braces):
    # the kind of line is then known from the event's format alone.
    logger.warn(
        f"refused ({limit}) {what}{{more}}",
        limit=limit,
        more=f" (and {more} more since the last such line)" if more else "",
        **fields,
    )


class _Key:
    """One key's window: when it opened, lines written in it, occurrences held."""

    __slots__ = ("held", "opened", "used")

    def __init__(self) -> None:
        self.opened = float("-inf")
        self.used = 0
        self.held = 0


class Throttle:
    """
    At most ``burst`` lines per key per ``every`` seconds; the rest counted.

    :param clock: the ``IReactorTime`` whose ``seconds()`` windows are measured on
    :param every: seconds a window lasts, from its first line
    :param burst: lines a window lets through
    """

    def __init__(self, clock: IReactorTime, every: float, burst: int = 1) -> None:
        self.clock = clock
        self.every = every
        self.burst = burst
        self._keys: dict[Hashable, _Key] = {}

    def _key(self, key: Hashable) -> _Key:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key()
        return state

    def _open(self, state: _Key, now: float) -> bool:
        """Whether a line may be written now, opening a new window if the last is over."""
        if now - state.opened >= self.every:
            state.opened, state.used = now, 0
        return state.used < self.burst

    def ready(self, key: Hashable = None) -> bool:
        """
        :param key: the kind of line
        :return: whether a line of ``key`` may be written now (nothing is counted)
        """
        state = self._keys.get(key)
        if state is None:
            return True
        return state.used < self.burst or self.clock.seconds() - state.opened >= self.every

    def offer(self, key: Hashable = None) -> int | None:
        """
        One occurrence that would like a line.

        :param key: the kind of line
        :return: None when it is held (counted, not to be written); otherwise it is to be
            written now, and this is how many were held since the last line of ``key``
            (to say ``and N more``), which are then no longer held
        """
        state = self._key(key)
        if not self._open(state, self.clock.seconds()):
            state.held += 1
            return None
        state.used += 1
        held, state.held = state.held, 0
        return held

    def flush(self, key: Hashable = None) -> int:
        """
        A line summing up the held occurrences of ``key``, if there are any and a line
        may be written now; that line counts as one of its window.

        :param key: the kind of line
        :return: how many it sums up (0: write nothing)
        """
        state = self._keys.get(key)
        if state is None or not state.held or not self._open(state, self.clock.seconds()):
            return 0
        state.used += 1
        held, state.held = state.held, 0
        return held

    def take(self, key: Hashable = None) -> int:
        """
        The held occurrences of ``key``, now no longer held, whatever the window (at
        stop, or for a summary that is not one of the window's lines).

        :param key: the kind of line
        :return: how many were held
        """
        state = self._keys.get(key)
        if state is None:
            return 0
        held, state.held = state.held, 0
        return held

    def held(self, key: Hashable = None) -> int:
        """:return: how many occurrences of ``key`` are held now"""
        state = self._keys.get(key)
        return 0 if state is None else state.held
