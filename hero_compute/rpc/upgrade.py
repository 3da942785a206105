"""
The upgrade hook of our HTTP protocol (RFC 9110 §7.8): a ``GET`` asking to switch
protocols is answered in pipeline order like any request, then the connection is handed
to the factory's ``upgrade`` hook (a WebSocket, :mod:`hero_compute.rpc.websocket`),
which gets every byte and the transport's producer calls from then on.
"""

from __future__ import annotations

from typing import Any

from .dispatch import CallContext
from .http_wire import Request

#: Bytes a client may send after an upgrade's head while the requests before it are
#: answered (as many as a WebSocket takes before its upgrade is answered).
MAX_WAITING = 64 * 1024


class Upgrading:
    """
    The upgrade half of :class:`~hero_compute.rpc.http_server.RpcHTTPProtocol`; before
    :class:`~hero_compute.rpc.backpressure.Backpressure` in its bases, whose producer
    calls it takes over once upgraded.
    """

    # What the connection holds (see RpcHTTPProtocol).
    factory: Any
    transport: Any
    _queue: list[Request]
    _idle_since: float | None
    #: What took the connection over, or None.
    _upgraded: Any = None

    def _pass_on(self, data: bytes) -> bool:
        """
        :return: whether ``data`` belongs to the protocol that took over (or is about
            to: bytes after an upgrade request not yet answered), and went there
        """
        if self._upgraded is not None:
            self._upgraded.dataReceived(data)
            return True
        if self._queue and self._queue[-1].upgrade is not None:
            waiting = self._queue[-1].upgrade
            if len(waiting) + len(data) > MAX_WAITING:
                # Nothing reads it until the requests before the upgrade are answered:
                # kept, it would grow with all the client sends meanwhile.
                self._queue[-1].upgrade = b""
                self.transport.abortConnection()
                return True
            self._queue[-1].upgrade = waiting + data
            return True
        return False

    def _upgrade_asked(self, data: bytes, offset: int) -> bool:
        """
        llhttp stopped at an upgrade request: keep what follows its head for the hook.

        :return: False when it cannot be upgraded here (no hook, not a ``GET``)
        """
        if self._queue and self._queue[-1].headers is not None:
            self._queue[-1].upgrade = data[offset:]
            return True
        return False

    def _take_over(self, request: Request) -> None:
        """Hand the connection to the hook, with the request's head as sent."""
        assert request.headers is not None and request.upgrade is not None
        head = b"GET %s HTTP/1.1\r\n%s\r\n" % (request.url, b"".join(request.headers))
        context = CallContext.from_transport(self.transport, self.factory.trust_domain)
        # Not idle any more in the HTTP sense: the new protocol has its own rules.
        self._idle_since = None
        self._upgraded = self.factory.upgrade(self.transport, head, context)
        if request.upgrade:
            self._upgraded.dataReceived(request.upgrade)

    def pauseProducing(self) -> None:
        if self._upgraded is not None:
            self._upgraded.pauseProducing()
        else:
            super().pauseProducing()  # type: ignore[misc]

    def resumeProducing(self) -> None:
        if self._upgraded is not None:
            self._upgraded.resumeProducing()
        else:
            super().resumeProducing()  # type: ignore[misc]

    def _upgraded_lost(self, reason: Any) -> None:
        if self._upgraded is not None:
            self._upgraded.connectionLost(reason)
            self._upgraded = None
