"""
The dashboard's open WebSockets (the console, the event stream: :mod:`.ui_console`),
held by the session they were opened with, so that the session's end cuts them at once
(CONTRACT §11: revoking a user ends its live sessions).

A session ends by an event of :class:`~.ui_accounts.UiAccounts` (revoked here, pushed
out, found expired or revoked on a request), by its expiry (one reactor timer per
session that holds a WebSocket), or by a revocation at another explorer of a shared
store, which reaches this one only as the store's mirror of revoked tokens: one sweep a
second reads it, for the sessions that hold a WebSocket, and only while any does (a
dictionary look-up each, no database call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import task
from twisted.logger import Logger

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

log = Logger()

#: Seconds between the looks at the store's mirror, while any session holds a
#: WebSocket.
SWEEP_INTERVAL = 1.0


class LiveSockets:
    """
    Session id -> the aborts of its open WebSockets, its expiry timer, and the sweep.

    :param clock: an ``IReactorTime``
    :param ended: ``ended(sid)``: whether a holding session has ended meanwhile (looked
        at by the sweep)
    :param end: ``end(sid)``: end a session (which then calls :meth:`cut`)
    """

    def __init__(
        self,
        clock: IReactorTime,
        ended: Callable[[str], bool],
        end: Callable[[str], None],
    ) -> None:
        self._clock = clock
        self._ended = ended
        self._end = end
        self._held: dict[str, set[Callable[[], None]]] = {}
        self._timers: dict[str, Any] = {}
        self._sweep: task.LoopingCall | None = None

    def hold(
        self,
        sid: str,
        expires_at: float | None,
        abort: Callable[[], None],
        sweep: bool = True,
    ) -> Callable[[], None]:
        """
        :param sid: the live session's id
        :param expires_at: its end (Unix seconds), or None
        :param abort: cuts the connection
        :param sweep: whether revocations elsewhere can end it (a shared store)
        :return: ``release()``, to call once the connection has closed by itself
        """
        self._held.setdefault(sid, set()).add(abort)
        if expires_at is not None and sid not in self._timers:
            delay = max(0.0, expires_at - self._clock.seconds())
            self._timers[sid] = self._clock.callLater(delay, self._end, sid)
        if sweep and self._sweep is None:
            self._sweep = task.LoopingCall(self._look)
            self._sweep.clock = self._clock
            self._sweep.start(SWEEP_INTERVAL, now=False)

        def release() -> None:
            held = self._held.get(sid)
            if held is not None:
                held.discard(abort)
                if not held:
                    self._drop(sid)

        return release

    def cut(self, sid: str) -> None:
        """The session ``sid`` has ended: abort its WebSockets."""
        aborts = self._held.get(sid, set())
        self._drop(sid)
        for abort in aborts:
            abort()

    def _drop(self, sid: str) -> None:
        self._held.pop(sid, None)
        timer = self._timers.pop(sid, None)
        if timer is not None and timer.active():
            timer.cancel()
        if not self._held and self._sweep is not None:
            self._sweep.stop()
            self._sweep = None

    def _look(self) -> None:
        # A failure is logged and the sweep goes on: stopped, it would leave every
        # session revoked elsewhere with its sockets open.
        for sid in list(self._held):
            try:
                if self._ended(sid):
                    self._end(sid)
            except Exception:
                log.failure("dashboard: checking a live session {sid:.8}", sid=sid)

    def __len__(self) -> int:
        return sum(len(aborts) for aborts in self._held.values())
