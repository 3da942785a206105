"""
The server side of WebSocket (RFC 6455; the protocol is :mod:`.websocket`): routes
matched against an upgrade request's path, the roles table asked, and the route's
verdict (a :class:`~.websocket.Handler`, or an :class:`~.websocket.HTTPRefusal`)
answered.  :class:`Routes` is the HTTP protocol's upgrade hook.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.utilities import RemoteProtocolError

from .dispatch import CallContext
from .errors import RefusedByPolicy
from .websocket import Handler, HTTPRefusal, WebSocket

log = Logger()

#: Bytes a client may send before its upgrade is answered (it should send none).
MAX_EARLY = 64 * 1024


@attrs.frozen
class UpgradeRequest:
    """
    An upgrade request matched to a route.

    :ivar route: the route's name, e.g. ``"console"``, for the roles table
    :ivar params: the route's named groups, e.g. ``{"vm_id": ...}``
    :ivar context: who asks, as for a JSON-RPC call
    """

    route: str
    params: Mapping[str, str]
    context: CallContext


#: ``accept(request)``: a :class:`Handler` (or a Deferred of one); raises (or fails
#: with) :class:`HTTPRefusal` to refuse.
Accept = Callable[[UpgradeRequest], Any]

#: ``authorize(context, route, params)``: raises
#: :class:`~hero_compute.rpc.errors.RefusedByPolicy` (see ``Policy.check_route``).
Authorize = Callable[[CallContext, str, Mapping[str, str]], None]


@attrs.frozen
class Route:
    """
    :ivar name: the route's name in the roles table
    :ivar pattern: a full-match regular expression of the path, with named groups
    :ivar accept: see :data:`Accept`
    """

    name: str
    pattern: re.Pattern[str]
    accept: Accept


class _ServerSocket(WebSocket):
    """The server side: waits for the route's verdict, then answers the upgrade."""

    _early = b""
    _pending: defer.Deferred[Handler] | None = None

    def answer(self, verdict: Handler | defer.Deferred[Handler]) -> None:
        d: defer.Deferred[Handler] = (
            verdict if isinstance(verdict, defer.Deferred) else defer.succeed(verdict)
        )
        self._pending = d
        d.addCallbacks(self._accepted, self._refused)

    def _accepted(self, handler: Handler) -> None:
        self._pending = None
        if self._gone:
            handler.closed(None)
            return
        self.transport.write(self._ws.send(AcceptConnection()))
        self._started(handler)
        early, self._early = self._early, b""
        if early:
            self.dataReceived(early)

    def _refused(self, failure: Failure) -> None:
        self._pending = None
        if failure.check(defer.CancelledError) or self._gone:
            return
        if isinstance(failure.value, HTTPRefusal):
            status, message = failure.value.status, failure.value.message
        else:
            log.failure("accepting a WebSocket failed", failure)
            status, message = 500, "internal error"
        self.refuse(status, message)

    def refuse(self, status: int, message: str) -> None:
        """Answer the upgrade with an HTTP error and close."""
        body = (message + "\n").encode("utf-8")
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
        ]
        self.transport.write(
            self._ws.send(RejectConnection(status, headers, has_body=True))
            + self._ws.send(RejectData(body))
        )
        self._gone = True
        self._hang_up()

    def dataReceived(self, data: bytes) -> None:
        if self.handler is None and not self._gone:
            self._early += data
            if len(self._early) > MAX_EARLY:
                self._gone = True
                self.transport.abortConnection()
            return
        WebSocket.dataReceived(self, data)

    def connectionLost(self, reason: Failure) -> None:
        if self._pending is not None:
            self._pending.cancel()
        WebSocket.connectionLost(self, reason)


class Routes:
    """
    The WebSocket routes of a server: the HTTP protocol's upgrade hook.

    :param routes: the :class:`Route` s
    :param authorize: see :data:`Authorize`
    :param max_unsent: bytes waiting for a peer beyond which it is dropped
    :param clock: an ``IReactorTime`` (the reactor if None)
    """

    def __init__(
        self,
        routes: Sequence[Route],
        authorize: Authorize,
        max_unsent: int,
        clock: Any = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._routes = list(routes)
        self._authorize = authorize
        self.max_unsent = max_unsent
        self._clock = clock

    def __call__(self, transport: Any, head: bytes, context: CallContext) -> WebSocket:
        """
        Take over a connection whose request (``head``, every byte of it) asks for an
        upgrade.

        :return: the :class:`WebSocket` that the HTTP protocol now passes bytes to
        """
        ws = WSConnection(ConnectionType.SERVER)
        socket = _ServerSocket(transport, ws, self.max_unsent, self._clock)
        try:
            ws.receive_data(head)
            request = next(e for e in ws.events() if isinstance(e, Request))
        except (RemoteProtocolError, StopIteration) as e:
            hint = getattr(e, "event_hint", None)
            status = hint.status_code if isinstance(hint, RejectConnection) else 400
            socket.refuse(status, f"not a WebSocket upgrade: {e}")
            return socket
        path = request.target.split("?", 1)[0]
        for route in self._routes:
            match = route.pattern.fullmatch(path)
            if match is not None:
                break
        else:
            socket.refuse(404, "no such resource")
            return socket
        # The query's parameters too (``/v1/events?since=N``); the path's win.
        query = urllib.parse.parse_qsl(request.target.partition("?")[2])
        params = {**dict(query), **match.groupdict()}
        try:
            self._authorize(context, route.name, params)
        except RefusedByPolicy as e:
            socket.refuse(403, str(e))
            return socket
        try:
            verdict = route.accept(UpgradeRequest(route.name, params, context))
        except HTTPRefusal as e:
            socket.refuse(e.status, e.message)
            return socket
        socket.answer(verdict)
        return socket
