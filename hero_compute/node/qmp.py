"""
A client for the QEMU Machine Protocol (QMP) over a stream connection.

QMP is line-delimited JSON.  On connect the server greets with ``{"QMP": ...}``; the
client must then negotiate capabilities (``qmp_capabilities``) before any other command
is accepted.  Replies to commands come back in the order the commands were sent (we never
ask for out-of-band execution), interleaved with asynchronous events such as
``SHUTDOWN``, ``STOP`` and ``RESUME``.

:obj:`QmpProtocol` does exactly that and nothing QEMU-specific beyond it; :obj:`connect_qmp`
connects it to a Unix socket and waits for the handshake.
"""

import collections
import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python import failure


class QmpError(Exception):
    """
    QMP itself went wrong: the peer broke the protocol or the connection is gone.
    """


class QmpConnectionLost(QmpError):
    """
    The connection closed before the reply (or the handshake) arrived.

    :ivar reason: the :obj:`Failure` the connection was lost with
    """

    def __init__(self, reason: failure.Failure) -> None:
        QmpError.__init__(self, f"QMP connection lost: {reason.getErrorMessage()}")
        self.reason = reason


class QmpCommandError(QmpError):
    """
    QEMU answered a command with an error object.

    :ivar error_class: QMP's error class, e.g. ``"CommandNotFound"``
    :ivar desc: QEMU's human-readable description
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        QmpError.__init__(self, f"QMP {command} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class _Observers:
    """
    Deferreds handed out before an outcome is known, all fired when it is; later callers
    get the outcome at once.  Each caller gets its own Deferred, so one caller cancelling
    (a timeout) never disturbs another.
    """

    def __init__(self) -> None:
        self._waiting: list[defer.Deferred[Any]] = []
        self._outcome: tuple[str, Any] | None = None

    def when(self):
        d: defer.Deferred[Any] = defer.Deferred()
        if self._outcome is not None:
            self._deliver(d)
        else:
            self._waiting.append(d)
        return d

    def succeed(self, result) -> None:
        """Fire every waiter with ``result`` (never a :obj:`Failure`: Deferreds errback
        those)."""
        self._settle(("succeed", result))

    def fail(self, reason) -> None:
        """Fail every waiter with ``reason``."""
        self._settle(("fail", reason))

    def _settle(self, outcome) -> None:
        if self._outcome is not None:
            return
        self._outcome = outcome
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            self._deliver(d)

    def _deliver(self, d) -> None:
        assert self._outcome is not None  # delivered only once there is one
        how, value = self._outcome
        # A waiter cancelled by its timeout ignores this: Deferred suppresses the
        # second call after a cancellation.
        if how == "fail":
            d.errback(value)
        else:
            d.callback(value)


class QmpProtocol(LineOnlyReceiver):
    """
    One QMP session.

    Use :obj:`when_ready` to learn that the handshake is done, :obj:`execute` to run
    commands and :obj:`when_disconnected` to learn that the session is over.

    :param on_event: called as ``on_event(name, data, timestamp)`` for every asynchronous
        event; ``data`` is a dict (empty when the event has none), ``timestamp`` Unix
        seconds or ``None``.  Exceptions it raises are logged and otherwise ignored.
    """

    log = Logger()
    delimiter = b"\n"
    # query-* replies for large machines run to tens of KiB; a megabyte line means the
    # peer is not QEMU.
    MAX_LENGTH = 1 << 20

    def __init__(
        self, on_event: Callable[[str, dict[str, Any], float | None], object] | None = None
    ) -> None:
        self._on_event = on_event
        self._pending: collections.deque[tuple[str, defer.Deferred[Any]]] = (
            collections.deque()
        )
        self._ready = _Observers()
        self._disconnected = _Observers()
        self._state = "greeting"
        self.greeting = None

    # -- public API -----------------------------------------------------------------

    def when_ready(self) -> defer.Deferred[dict[str, Any]]:
        """
        :return: a Deferred that fires with the server's greeting (the ``QMP`` object)
            once capabilities are negotiated, or fails with :obj:`QmpError` if the session
            ends first
        """
        return self._ready.when()

    def when_disconnected(self) -> defer.Deferred[Any]:
        """
        :return: a Deferred that fires, never fails, when the session ends, with the
            exception the connection was lost with (e.g. ``ConnectionDone``)
        """
        return self._disconnected.when()

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None
    ) -> defer.Deferred[Any]:
        """
        Run one command.

        :param command: the QMP command name, e.g. ``"query-status"``
        :param arguments: optional dict of arguments
        :return: a Deferred firing with the ``return`` value, or failing with
            :obj:`QmpCommandError` (QEMU refused) or :obj:`QmpConnectionLost`
        """
        if self._state != "ready":
            return defer.fail(
                QmpError(f"QMP session not ready ({self._state}) for {command}")
            )
        return self._send(command, arguments)

    def disconnect(self) -> None:
        """
        Close the session from our side.  QEMU keeps running; pending commands fail with
        :obj:`QmpConnectionLost`.
        """
        if self.transport is not None:
            self.transport.loseConnection()

    # -- protocol -------------------------------------------------------------------

    def _send(self, command, arguments):
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        d: defer.Deferred[Any] = defer.Deferred()
        self._pending.append((command, d))
        self.sendLine(json.dumps(message).encode("utf-8"))
        return d

    def lineReceived(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            message = json.loads(line)
        except ValueError:
            return self._protocol_error(f"not JSON: {line[:200]!r}")
        if not isinstance(message, dict):
            return self._protocol_error(f"not a JSON object: {line[:200]!r}")

        if self._state == "greeting":
            if "QMP" not in message:
                return self._protocol_error(
                    f"expected the QMP greeting, got {line[:200]!r}"
                )
            self.greeting = message["QMP"]
            self._state = "negotiating"
            self._send("qmp_capabilities", None).addCallbacks(
                self._negotiated, self._negotiation_failed
            )
        elif "event" in message:
            self._event(message)
        elif "return" in message or "error" in message:
            self._reply(message)
        else:
            self._protocol_error(f"unexpected message {line[:200]!r}")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._protocol_error(f"line longer than {self.MAX_LENGTH} bytes")

    def _negotiated(self, _) -> None:
        self._state = "ready"
        self._ready.succeed(self.greeting)

    def _negotiation_failed(self, reason) -> None:
        # Connection loss already failed the ready observers; anything else is QEMU
        # refusing the handshake, after which the session is useless.
        if not reason.check(QmpConnectionLost):
            self._ready.fail(
                failure.Failure(
                    QmpError(f"capabilities negotiation failed: {reason.getErrorMessage()}")
                )
            )
            self.disconnect()

    def _reply(self, message):
        if not self._pending:
            return self._protocol_error(f"reply without a command: {message!r}")
        command, d = self._pending.popleft()
        if "error" in message:
            err = message["error"] if isinstance(message["error"], dict) else {}
            d.errback(
                QmpCommandError(
                    command,
                    err.get("class", "GenericError"),
                    err.get("desc", repr(message["error"])),
                )
            )
        else:
            d.callback(message["return"])

    def _event(self, message) -> None:
        data = message.get("data")
        stamp = message.get("timestamp")
        seconds = None
        if isinstance(stamp, dict):
            seconds = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
        if self._on_event is None:
            return
        try:
            self._on_event(
                message["event"], data if isinstance(data, dict) else {}, seconds
            )
        except Exception:
            self.log.failure("QMP event handler failed for {event}", event=message["event"])

    def _protocol_error(self, why) -> None:
        self.log.warn("QMP protocol error, closing: {why}", why=why)
        self._state = "broken"
        if self.transport is not None:
            # A Unix connection: it can be aborted (ITransport does not say so).
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: failure.Failure = protocol.connectionDone) -> None:
        self._state = "closed"
        lost = QmpConnectionLost(reason)
        self._ready.fail(failure.Failure(lost))
        pending, self._pending = self._pending, collections.deque()
        for _, d in pending:
            d.errback(lost)
        self._disconnected.succeed(reason.value)


def connect_qmp(
    reactor: Any,
    path: str,
    on_event: Callable[[str, dict[str, Any], float | None], object] | None = None,
    timeout: float = 10.0,
) -> defer.Deferred[QmpProtocol]:
    """
    Connect to a QMP Unix socket and negotiate capabilities.

    :param reactor: an ``IReactorUNIX`` and ``IReactorTime``
    :param path: the socket's path
    :param on_event: passed to :obj:`QmpProtocol`
    :param timeout: seconds for connecting and the handshake together
    :return: a Deferred firing with the ready :obj:`QmpProtocol`, or failing with
        ``ConnectError``, :obj:`QmpError` or ``TimeoutError``
    """
    endpoint = endpoints.UNIXClientEndpoint(reactor, path, timeout=timeout)
    factory = protocol.Factory.forProtocol(lambda: QmpProtocol(on_event))

    async def connect():
        proto = await endpoint.connect(factory)
        ready = proto.when_ready()
        ready.addTimeout(timeout, reactor)
        try:
            await ready
        except BaseException:
            # A half-open session would otherwise linger until QEMU exits.
            proto.transport.abortConnection()
            raise
        return proto

    return defer.Deferred.fromCoroutine(connect())


__all__ = [
    "QmpError",
    "QmpConnectionLost",
    "QmpCommandError",
    "QmpProtocol",
    "connect_qmp",
]
