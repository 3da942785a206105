"""
Where a download's body goes: :class:`BodySink` receives it from the HTTP client and
has a :class:`TempFile` hash and write it on the reactor's thread pool, one chunk at a
time.  The reactor only queues bytes, and stops reading from the server while too many
wait (``pauseProducing``), so a slow disk slows the download instead of filling memory.
Every way a body can end badly (too big, idle too long, too slow, cut, a write that
fails) ends in one :class:`~hero_compute.node.fetch_errors.FetchError`.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol, threads
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from .fetch_errors import FetchError

#: Bytes received but not yet on disk before the server is paused.
HIGH_WATER = 4 * 1024 * 1024


class TempFile:
    """
    The file a download goes into, and the digest of what was written; its methods but
    :meth:`open` and :meth:`discard` run on a pool thread, one at a time.

    :param path: where to create it (must not exist)
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.digest = hashlib.sha256()
        self._fd: int | None = None

    def open(self) -> None:
        """Create it, 0644 (base images hold nothing secret), failing if it exists."""
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def write(self, data: bytes) -> None:
        """Hash and write ``data`` whole."""
        fd = self._fd
        assert fd is not None, "write before open"
        self.digest.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def finish(self) -> None:
        """Flush it to disk and close it."""
        fd = self._fd
        assert fd is not None, "finish before open"
        os.fsync(fd)
        os.close(fd)
        self._fd = None

    def discard(self) -> None:
        """Close and remove it; nothing is left behind."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class BodySink(protocol.Protocol):
    """
    Receives a response body into a :class:`TempFile`.

    :param reactor: the reactor (its thread pool does the writes)
    :param file: the opened :class:`TempFile`
    :param limit: the most bytes allowed
    :param total: the length the server announced, or None
    :param progress: ``progress(bytes_done, total)``, as bytes arrive
    :param idle: seconds without a byte before the body is cut
    :param min_rate: the least average bytes per second over each ``window``, or 0 for
        no minimum: a server dripping bytes would otherwise hold an import slot for
        good, never idle long enough to be cut
    :param window: seconds over which the rate is averaged; the first ends ``window``
        seconds after the body starts (its grace period)

    :ivar done: fires None once all of it is written, or fails with :class:`FetchError`
    """

    # The response body's transport: a push producer too (pause, resume, stop), which
    # ITransport does not say.
    transport: Any

    def __init__(
        self,
        reactor: Any,
        file: TempFile,
        limit: int,
        total: int | None,
        progress: Callable[[int, int | None], object],
        idle: float,
        min_rate: float = 0,
        window: float = 30.0,
    ) -> None:
        self._reactor = reactor
        self._file = file
        self._limit = limit
        self._total = total
        self._progress = progress
        self._idle = idle
        self._min_rate = min_rate
        self._window = window
        self.done: defer.Deferred[None] = defer.Deferred()
        self.received = 0
        self._queue: list[bytes] = []
        self._queued = 0
        self._writing = False
        self._paused = False
        self._ended: bool | None = None
        self._error: FetchError | None = None
        # Set from connectionMade on; Any: IDelayedCall | None, read where it is set.
        self._timer: Any = None
        self._rate_timer: Any = None
        # Bytes received when the current rate window began, and whether we paused the
        # server in it (our disk's slowness is not the server's).
        self._window_start = 0
        self._held = False

    def abort(self, error: FetchError) -> None:
        """Fail with ``error`` and drop the connection (once it is handed over)."""
        if self.transport is None:
            self._error = error
        else:
            self._fail(error)

    def connectionMade(self) -> None:
        if self._error is not None:
            self.transport.stopProducing()
            return
        self._timer = self._reactor.callLater(self._idle, self._stalled)
        if self._min_rate > 0:
            self._rate_timer = self._reactor.callLater(self._window, self._check_rate)

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._timer.reset(self._idle)
        self.received += len(data)
        if self.received > self._limit:
            self._fail(
                FetchError(
                    f"larger than NODE_IMAGE_MAX ({self._limit} bytes): cut at "
                    f"{self.received} bytes"
                )
            )
            return
        self._progress(self.received, self._total)
        self._queue.append(data)
        self._queued += len(data)
        if self._queued > HIGH_WATER and not self._paused:
            self._paused = self._held = True
            self.transport.pauseProducing()
        self._write_next()

    def _write_next(self) -> None:
        if self._writing or not self._queue or self._error is not None:
            return
        chunk = b"".join(self._queue)
        self._queue.clear()
        self._queued = 0
        self._writing = True
        d = threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self._file.write, chunk
        )
        d.addCallbacks(self._written, self._write_failed)

    def _written(self, _) -> None:
        self._writing = False
        if self._timer is not None:
            # A slow disk is no idle server: the clock runs only while we can read.
            self._timer.reset(self._idle)
        if self._paused and self._ended is None:
            self._paused = False
            self.transport.resumeProducing()
        self._write_next()
        self._maybe_done()

    def _write_failed(self, failure) -> None:
        self._writing = False
        error = failure.value
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            reason = f"disk full (ENOSPC) after {self.received} bytes"
        else:
            reason = f"cannot write the image: {failure.getErrorMessage()}"
        self._fail(FetchError(reason))

    def _stalled(self) -> None:
        self._timer = None
        self._fail(FetchError(f"no data for {self._idle:g} s after {self.received} bytes"))

    def _check_rate(self) -> None:
        self._rate_timer = None
        got = self.received - self._window_start
        if got < self._min_rate * self._window and not self._held:
            self._fail(
                FetchError(
                    f"too slow: {got} bytes in the last {self._window:g} s (the least "
                    f"is {self._min_rate:g} bytes/s), after {self.received} bytes"
                )
            )
            return
        self._window_start = self.received
        self._held = self._paused
        self._rate_timer = self._reactor.callLater(self._window, self._check_rate)

    def _fail(self, error) -> None:
        if self._error is None:
            self._error = error
            self._queue.clear()
            if self._ended is None:
                self.transport.stopProducing()
        self._maybe_done()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        for timer in (self._timer, self._rate_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._rate_timer = None
        self._ended = True
        # PotentialDataLoss: no length was announced, and the server closed; the
        # digest tells whether it was all.
        if not reason.check(ResponseDone, PotentialDataLoss):
            if self._error is None:
                expected = "" if self._total is None else f" of {self._total}"
                self._error = FetchError(
                    f"connection cut after {self.received}{expected} bytes"
                )
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.done.called or self._writing or self._ended is None:
            return
        if self._error is not None:
            self.done.errback(self._error)
        elif not self._queue:
            self.done.callback(None)
        else:
            self._write_next()
