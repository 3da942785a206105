"""
Reload on SIGHUP, the one way for every process: the signal handler only hands the
reload to the reactor thread; the reload runs there, and its outcome is logged; the
handler that was there before is put back at stop.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

log = Logger()


class HangupReload:
    """
    Run ``reload`` in the reactor thread on each SIGHUP, between :meth:`install` and
    :meth:`restore`.

    :param reactor: the reactor the reload is handed to (``callFromThread``)
    :param reload: does the work and returns what it did, for the log (e.g. "TLS
        material reloaded from ..."); raises one of ``errors`` when it could not, the
        previous state staying in use
    :param errors: the exceptions that mean "not reloaded", logged as a warning
    :param what: what is reloaded, for the warning (e.g. "TLS material")
    """

    def __init__(
        self,
        reactor: Any,
        reload: Callable[[], str],
        errors: tuple[type[BaseException], ...],
        what: str,
    ) -> None:
        self._reactor = reactor
        self._reload = reload
        self._errors = errors
        self._what = what
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        """Handle SIGHUP from now on (nothing outside the main thread: no signals)."""
        if self._installed:
            return
        try:
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)
        except ValueError:  # not the main thread: no signals to be had
            return
        self._installed = True

    def restore(self) -> None:
        """Put back the handler that was there before :meth:`install`."""
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous)
            self._installed = False
            self._previous = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        # In a signal handler: only hand the work to the reactor thread.
        self._reactor.callFromThread(self.run)

    def run(self) -> None:
        """Reload now (in the reactor thread), and log how it went."""
        try:
            done = self._reload()
        except self._errors as e:
            log.warn(
                "SIGHUP: {what} not reloaded, the previous stays in use: {error}",
                what=self._what,
                error=str(e),
            )
            return
        log.info("SIGHUP: {done}", done=done)
