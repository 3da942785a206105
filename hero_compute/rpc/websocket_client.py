"""
The client side of a WebSocket (see :mod:`hero_compute.rpc.websocket`): the explorer's
leg to a node's console, and the CLI's ``vm console``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol
from twisted.python.failure import Failure
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, RejectConnection, RejectData, Request

from .websocket import MAX_REFUSAL_BODY, Handler, HTTPRefusal, WebSocket


class ClientProtocol(protocol.Protocol):
    """
    The client side of one WebSocket: asks for ``target`` once connected.

    :param host: the ``Host`` header
    :param target: the request target, e.g. ``/v1/vms/<id>/console``
    :param handler: the :class:`Handler`, once accepted
    :param max_unsent: bytes waiting for the server beyond which it is dropped
    :param clock: an ``IReactorTime``, for the bound on a close
    """

    transport: Any

    def __init__(
        self, host: str, target: str, handler: Handler, max_unsent: int, clock: Any
    ) -> None:
        self._host = host
        self._target = target
        self._handler = handler
        self._max_unsent = max_unsent
        self._clock = clock
        #: Fires with the :class:`WebSocket` once accepted, or fails with
        #: :class:`HTTPRefusal` or the connection's failure.
        self.accepted: defer.Deferred[WebSocket] = defer.Deferred()
        self.socket: _ClientSocket | None = None

    def connectionMade(self) -> None:
        ws = WSConnection(ConnectionType.CLIENT)
        self.socket = _ClientSocket(self.transport, ws, self._max_unsent, self._clock, self)
        self.transport.registerProducer(self.socket, True)
        self.transport.write(ws.send(Request(host=self._host, target=self._target)))

    def dataReceived(self, data: bytes) -> None:
        assert self.socket is not None
        self.socket.dataReceived(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.socket is not None:
            self.socket.lost(reason)
        if not self.accepted.called:
            self.accepted.errback(reason)


class _ClientSocket(WebSocket):
    def __init__(
        self,
        transport: Any,
        ws: WSConnection,
        max_unsent: int,
        clock: Any,
        owner: ClientProtocol,
    ) -> None:
        WebSocket.__init__(self, transport, ws, max_unsent, clock)
        self._owner = owner
        self._status = 0
        self._body = b""

    def _other(self, event: Event) -> None:
        owner = self._owner
        if isinstance(event, AcceptConnection):
            self._started(owner._handler)
            owner.accepted.callback(self)
        elif isinstance(event, RejectConnection):
            self._status = event.status_code
            if not event.has_body:
                self._rejected()
        elif isinstance(event, RejectData):
            self._body = (self._body + bytes(event.data))[:MAX_REFUSAL_BODY]
            if event.body_finished:
                self._rejected()

    def _rejected(self) -> None:
        owner = self._owner
        self._gone = True
        self._hang_up()
        if not owner.accepted.called:
            text = self._body.decode("utf-8", "replace").strip()
            owner.accepted.errback(HTTPRefusal(self._status, text))

    def lost(self, reason: Failure) -> None:
        self.transport.unregisterProducer()
        self.connectionLost(reason)


def connect(
    endpoint: Any,
    host: str,
    target: str,
    handler: Handler,
    max_unsent: int,
    timeout: float,
    clock: Any,
) -> defer.Deferred[WebSocket]:
    """
    Open a WebSocket.

    :param endpoint: an ``IStreamClientEndpoint`` (Unix, TCP or TLS)
    :param host: the ``Host`` header
    :param target: the request target
    :param handler: the :class:`Handler` of the connection
    :param max_unsent: bytes waiting for the server beyond which it is dropped
    :param timeout: seconds for connecting and the handshake
    :param clock: an ``IReactorTime``
    :return: a Deferred of the open :class:`WebSocket`; fails with
        :class:`HTTPRefusal` when the server refuses the upgrade
    """
    made: list[ClientProtocol] = []

    def build() -> ClientProtocol:
        proto = ClientProtocol(host, target, handler, max_unsent, clock)
        made.append(proto)
        return proto

    factory = protocol.Factory.forProtocol(build)  # type: ignore[arg-type]
    factory.noisy = False
    d: defer.Deferred[WebSocket] = endpoint.connect(factory).addCallback(
        lambda proto: proto.accepted
    )

    def timed_out(result: Any) -> Any:
        # Given up on (or cancelled by a caller gone meanwhile): a connection made
        # must not stay open at the server, holding a place.
        if isinstance(result, Failure) and made:
            if result.check(defer.TimeoutError, defer.CancelledError):
                made[0].transport.abortConnection()
        return result

    d.addTimeout(timeout, clock)
    d.addBoth(timed_out)
    return d
