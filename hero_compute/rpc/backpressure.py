"""
Back-pressure for a connection we answer on (CONTRACT §7, ``HERO_MAX_UNSENT``): we are
the transport's push producer, so once ``max_unsent`` bytes of answers wait for a peer
that does not read, we stop reading (and answering) it until they drain.
"""

from __future__ import annotations

from typing import Any


class Backpressure:
    """
    The :class:`~twisted.internet.interfaces.IPushProducer` half of
    :class:`~hero_compute.rpc.http_server.RpcHTTPProtocol`: the transport's verdict on
    our unsent output, and whether we read.
    """

    # What the connection holds (see RpcHTTPProtocol).
    factory: Any
    transport: Any
    _buffer_size: int
    _paused: bool
    _lost: bool
    _write_paused = False
    #: Bytes of answers counted as waiting since the transport said it holds more than
    #: its buffer size, or None when it has not (or has drained since).
    _unsent: int | None = None
    _reading_paused = False

    def _next(self) -> None:
        raise NotImplementedError

    def _produce(self, read_size: int) -> None:
        """
        Become the transport's producer, once connected.

        The transport tells us when answers pile up unsent past its buffer size, and
        when they have drained.  That size is also how much Twisted asks of the socket
        per read, and a read of a megabyte costs about 30 us more than one of 64 kB
        however little arrives: it stays small (``read_size`` at most), and we count
        the rest of our limit ourselves (:meth:`pauseProducing`).
        """
        self._buffer_size = min(self.factory.limits.max_unsent, read_size)
        transport = self.transport
        while transport is not None:
            if hasattr(transport, "bufferSize"):
                transport.bufferSize = self._buffer_size
            transport = getattr(transport, "transport", None)
        self.transport.registerProducer(self, True)

    def pauseProducing(self) -> None:
        # More than the transport's buffer size waits unsent: from now until it has
        # drained, every answer counts towards our limit (an upper bound: some of it
        # may go out meanwhile).
        if self._unsent is None:
            self._unsent = self._buffer_size
        self._count_unsent(0)

    def _count_unsent(self, sent: int) -> None:
        assert self._unsent is not None
        self._unsent += sent
        if self._unsent > self.factory.limits.max_unsent and not self._write_paused:
            self._write_paused = True
            self._update_reading()

    def resumeProducing(self) -> None:
        self._unsent = None
        self._write_paused = False
        self._update_reading()
        if not self._lost:
            self._next()

    def stopProducing(self) -> None:
        pass

    def _update_reading(self) -> None:
        paused = self._paused or self._write_paused
        if paused != self._reading_paused and not self._lost:
            self._reading_paused = paused
            if paused:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()
