"""
The explorer's event stream (CONTRACT §10): ``GET /v1/events`` on every listener, a
WebSocket of JSON text frames ``{seq, time, type, node_id?, vm_id?, actor?, data}``.

Events are this explorer's own: its view of the fleet (a node online, offline, removed,
enrolled, revoked) and the VM calls made through it.  ``seq`` grows by one per event; a
ring keeps the last :data:`KEEP` for ``?since=<seq>`` replay.

Each event is encoded once, as the WebSocket frame every reader gets (a server's frames
are the same for every peer), and the ring keeps those bytes.  A replay is written from
the ring in slices of :data:`SLICE` bytes, one at a time as the reader's connection
takes them, so that a hundred readers asking for the whole ring cost the explorer a
slice each per turn of the reactor, not ten thousand writes each.  Live events reach a
replaying reader through the ring, when its replay gets to them; then it reads live.

A reader that falls behind is closed with 1008 and resumes with ``since``; nobody else
waits for it.  Behind means: :data:`MAX_BEHIND` more bytes of events for it while its
connection is full, or (while replaying) a connection that stays full for
:data:`STALL` seconds, or a replay overtaken by the ring.  The kernel's send buffer of
a reader is capped (:data:`SEND_BUFFER`), so that a reader that takes nothing is seen
to be full, instead of megabytes going into the kernel for it unseen.
"""

from __future__ import annotations

import collections
import functools
import inspect
import itertools
import json
import re
import socket as socket_
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from hero_compute.rpc.websocket import (
    POLICY_VIOLATION,
    HTTPRefusal,
    WebSocket,
    text_frame,
)
from hero_compute.rpc.websocket_server import Route, UpgradeRequest

from .audit import arguments_by_name, caller_of

log = Logger()

#: Events kept for replay (the contract: at least the last 10,000).
KEEP = 10_000

#: What an event's ``vm_id`` may be (a VM's id or name); anything else is left out.
_VM_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")

#: Characters kept of a proxied method's name in an event.
_MAX_METHOD = 64

#: Bytes sent to a reader whose transport is full before it is closed with 1008.
MAX_BEHIND = 256 * 1024

#: Bytes of the replay written at a time (one write; one per reader per reactor turn).
SLICE = 16 * 1024

#: Seconds a replaying reader's connection may stay full before it is closed with 1008
#: (one taking less than about 16 KiB a second: its connection empties no more).
STALL = 5.0

#: The kernel's send buffer asked for a reader's socket (``SO_SNDBUF``; Linux holds
#: up to twice that, its bookkeeping included): by default a loopback socket grows to
#: take about 1.6 MB for a peer that reads nothing, and a reader would only be seen
#: as full after that much.  About 2 MB/s at 100 ms round trip is plenty for events.
SEND_BUFFER = MAX_BEHIND // 2

#: Seconds a reader closed for being slow has to take the close before it is cut off.
CLOSE_GRACE = 10.0

PATH = re.compile(r"/v1/events/?")

#: Proxied VM calls and the event each makes when it succeeds.
VM_EVENTS = {
    "vm.create": "vm.created",
    "vm.start": "vm.started",
    "vm.stop": "vm.stopped",
    "vm.delete": "vm.deleted",
}

#: Explorer methods and the node event each makes when it succeeds.
NODE_EVENTS = {
    "explorer.enroll": "node.enrolled",
    "explorer.revoke": "node.revoked",
    "explorer.remove_node": "node.removed",
}


class _Reader:
    """One ``/v1/events`` WebSocket (a :class:`~hero_compute.rpc.websocket.Handler`)."""

    def __init__(self, log_: EventLog, since: int | None) -> None:
        self._log = log_
        #: While replaying, the seq of the last event written; None once live.
        self._cursor = since
        self.socket: WebSocket | None = None
        #: Bytes of events for it since its connection filled; None while it takes.
        self._behind: int | None = None
        #: The next slice of the replay, or the end of a full connection's grace.
        self._next: Any = None

    def opened(self, socket: WebSocket) -> None:
        self.socket = socket
        socket.writable = self._writable
        _cap_send_buffer(socket.transport)
        self._log.readers.add(self)
        if self._cursor is not None:
            # The events no longer held are not waited for.
            self._cursor = max(self._cursor, self._log.first - 1)
            self._replay()

    def _replay(self) -> None:
        """Write the next slice of the replay; once it has caught up, read live."""
        self._next = None
        socket, log_ = self.socket, self._log
        if socket is None or self._cursor is None or self._behind is not None:
            return
        if self._cursor < log_.first - 1:
            # The ring went past what it had not been sent yet.
            self._too_slow()
            return
        frames, self._cursor = log_.frames_after(self._cursor, SLICE)
        if self._cursor >= log_.seq:
            self._cursor = None
        socket.send_frames(frames)
        if self._cursor is not None and self._behind is None and self.socket is not None:
            # One slice per reader per turn: the other readers and callers are served
            # in between.
            self._next = log_.clock.callLater(0, self._replay)

    def _writable(self, writable: bool) -> None:
        self._cancel()
        if self.socket is None:
            return
        if writable:
            self._behind = None
            self._replay()
        else:
            self._behind = 0
            if self._cursor is not None:
                self._next = self._log.clock.callLater(STALL, self._too_slow)

    def push(self, frame: bytes) -> None:
        """Send one event's frame (a replaying reader gets it from the ring)."""
        socket = self.socket
        if socket is None:
            return
        if self._cursor is None:
            socket.send_frames(frame)
        if self._behind is not None:
            self._behind += len(frame)
            if self._behind > MAX_BEHIND:
                self._too_slow()

    def _too_slow(self) -> None:
        self._cancel()
        socket = self.socket
        if socket is None:
            return
        self._log.readers.discard(self)
        self.socket = None
        socket.close(POLICY_VIOLATION, "too slow: resume with ?since=<last seq read>")
        # A reader that takes neither the backlog nor the close is cut off.
        transport = socket.transport
        self._log.clock.callLater(
            CLOSE_GRACE,
            lambda: transport.connected and transport.abortConnection(),
        )

    def _cancel(self) -> None:
        if self._next is not None:
            if self._next.active():
                self._next.cancel()
            self._next = None

    def received(self, data: bytes) -> None:
        """Readers have nothing to say."""

    def closed(self, code: int | None) -> None:
        self._cancel()
        self.socket = None
        self._log.readers.discard(self)


def _cap_send_buffer(transport: Any) -> None:
    """Cap the kernel's send buffer of the socket under ``transport`` (TLS's too)."""
    for _ in range(8):  # wrappers (TLS, policies) over the socket's transport
        get = getattr(transport, "getHandle", None)
        handle = get() if get is not None else None
        if isinstance(handle, socket_.socket):
            try:
                handle.setsockopt(socket_.SOL_SOCKET, socket_.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass  # gone already: connectionLost follows
            return
        transport = getattr(transport, "transport", None)
        if transport is None:
            return


class EventLog:
    """
    :param clock: ``IReactorTime`` (Unix seconds)
    :param keep: events kept for replay
    """

    def __init__(self, clock: Any, keep: int = KEEP) -> None:
        self.clock = clock
        #: ``(seq, frame)``: each event's WebSocket frame, as every reader gets it.
        self._ring: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=keep)
        #: The last event's ``seq`` (0 before the first).
        self.seq = 0
        self.readers: set[_Reader] = set()

    @property
    def first(self) -> int:
        """The ``seq`` of the first event held (``seq + 1`` when none is)."""
        return self._ring[0][0] if self._ring else self.seq + 1

    def emit(
        self,
        type: str,
        node_id: str | None = None,
        vm_id: str | None = None,
        actor: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        """Record an event and send it to every reader."""
        self.seq += 1
        event: dict[str, Any] = {
            "seq": self.seq,
            "time": self.clock.seconds(),
            "type": type,
        }
        if node_id is not None:
            event["node_id"] = node_id
        if vm_id is not None:
            event["vm_id"] = vm_id
        if actor is not None:
            event["actor"] = actor
        event["data"] = data or {}
        frame = text_frame(json.dumps(event, separators=(",", ":")))
        self._ring.append((self.seq, frame))
        for reader in list(self.readers):
            reader.push(frame)

    def frames_after(self, since: int, limit: int) -> tuple[bytes, int]:
        """
        :param since: a seq, at least :attr:`first` - 1
        :param limit: bytes to stop at (the frame that reaches it is included)
        :return: the held frames after ``since``, joined, and the last one's seq
        """
        parts, size, last = [], 0, since
        if since >= self.seq:
            return b"", since
        start = since + 1 - self.first
        for seq, frame in itertools.islice(self._ring, max(start, 0), None):
            parts.append(frame)
            size += len(frame)
            last = seq
            if size >= limit:
                break
        return b"".join(parts), last

    def route(self) -> Route:
        """The ``/v1/events`` route."""

        def accept(request: UpgradeRequest) -> _Reader:
            text = request.params.get("since")
            try:
                since = None if text is None else int(text)
            except ValueError:
                raise HTTPRefusal(400, "since: an event seq (an integer)") from None
            return _Reader(self, since)

        return Route("events", PATH, accept)

    # -- where events come from --------------------------------------------------------

    def node(self, type: str, node_id: str, **data: Any) -> None:
        """A node event of the registry (``node.online``, ``node.offline``)."""
        self.emit(type, node_id=node_id, data=data)

    def registrar(self, rpc: Any) -> Any:
        """
        :param rpc: a dispatcher (or a registrar wrapping one)
        :return: one whose ``register`` makes the events of :data:`NODE_EVENTS` and
            :data:`VM_EVENTS` when their calls succeed
        """
        return _Registrar(rpc, self)

    def _done(self, method: str, context: Any, params: dict, result: Any) -> None:
        actor = caller_of(context)
        if method in NODE_EVENTS:
            node_id = params.get("node_id")
            if method == "explorer.enroll":
                from .credentials import csr_node_id

                node_id = csr_node_id(params.get("csr") or "")
            self.emit(NODE_EVENTS[method], node_id=node_id, actor=actor)
            return
        if method == "explorer.create_vm":
            # Placed and created: the answer names the node chosen and the VM.
            if isinstance(result, dict):
                self.emit(
                    "vm.created",
                    node_id=result.get("node_id"),
                    vm_id=_vm_id(result.get("vm_id")),
                    actor=actor,
                )
            return
        inner_method = params.get("method")
        inner = params.get("params")
        vm_id = inner.get("vm_id") if isinstance(inner, dict) else None
        if isinstance(result, dict):
            vm_id = result.get("vm_id", vm_id)
        # Both come from the caller and the node unchecked: an event kept for replay
        # must stay small whatever they sent (a node answering with a 4 MiB vm_id
        # would otherwise fill the ring with gigabytes).
        vm_id = _vm_id(vm_id)
        if isinstance(inner_method, str):
            inner_method = inner_method[:_MAX_METHOD]
        if isinstance(result, dict):
            if result.get("state") == "error":
                self.emit(
                    "vm.error",
                    node_id=params.get("node_id"),
                    vm_id=vm_id,
                    actor=actor,
                    data={"method": inner_method},
                )
                return
        if inner_method in VM_EVENTS:
            self.emit(
                VM_EVENTS[inner_method],
                node_id=params.get("node_id"),
                vm_id=vm_id,
                actor=actor,
            )


def _vm_id(value: Any) -> str | None:
    return value if isinstance(value, str) and _VM_ID.fullmatch(value) else None


class _Registrar:
    def __init__(self, rpc: Any, events: EventLog) -> None:
        self._rpc = rpc
        self._events = events

    def register(self, name: str, func: Any, context: bool = False) -> Any:
        if name not in NODE_EVENTS and name not in ("explorer.call", "explorer.create_vm"):
            return self._rpc.register(name, func, context=context)
        signature = inspect.signature(func)
        params = list(signature.parameters.values())[1 if context else 0 :]
        named_by = arguments_by_name(signature.replace(parameters=params))
        events = self._events

        @functools.wraps(func)
        def evented(ctx: Any, *args: Any, **kwargs: Any) -> Any:
            result = func(ctx, *args, **kwargs) if context else func(*args, **kwargs)

            def done(value: Any) -> Any:
                try:
                    named = dict(named_by(args, kwargs))
                    events._done(name, ctx, named, value)
                except Exception:
                    log.failure("event for {method} not made", method=name)
                return value

            if isinstance(result, defer.Deferred):
                return result.addCallback(done)
            return done(result)

        first = inspect.Parameter("context", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        evented.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[first, *params]
        )
        return self._rpc.register(name, evented, context=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rpc, name)
