"""
The explorer's event stream (CONTRACT §10): ``GET /v1/events`` on every listener, a
WebSocket of JSON text frames ``{seq, time, type, node_id?, vm_id?, actor?, data}``.

Events are this explorer's own: its view of the fleet (a node online, offline, removed,
enrolled, revoked) and the VM calls made through it.  ``seq`` grows by one per event; a
ring keeps the last :data:`KEEP` for ``?since=<seq>`` replay.  A reader that falls
behind (its transport's buffer full and :data:`MAX_BEHIND` more bytes for it) is closed
with 1008 and resumes with ``since``; nobody else waits for it.
"""

from __future__ import annotations

import collections
import functools
import inspect
import json
import re
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from hero_compute.rpc.websocket import POLICY_VIOLATION, HTTPRefusal, WebSocket
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
        self._since = since
        self.socket: WebSocket | None = None
        self._behind: int | None = None

    def opened(self, socket: WebSocket) -> None:
        self.socket = socket
        socket.writable = self._writable
        for frame in self._log.after(self._since):
            self.push(frame)
        self._log.readers.add(self)

    def _writable(self, writable: bool) -> None:
        self._behind = None if writable else 0

    def push(self, frame: str) -> None:
        socket = self.socket
        if socket is None:
            return
        socket.send_text(frame)
        if self._behind is not None:
            self._behind += len(frame)
            if self._behind > MAX_BEHIND:
                self._log.readers.discard(self)
                self.socket = None
                socket.close(
                    POLICY_VIOLATION,
                    f"too slow: resume with ?since={self._log.seq}",
                )
                # A reader that takes neither the backlog nor the close is cut off.
                transport = socket.transport
                self._log.clock.callLater(
                    CLOSE_GRACE,
                    lambda: transport.connected and transport.abortConnection(),
                )

    def received(self, data: bytes) -> None:
        """Readers have nothing to say."""

    def closed(self, code: int | None) -> None:
        self.socket = None
        self._log.readers.discard(self)


class EventLog:
    """
    :param clock: ``IReactorTime`` (Unix seconds)
    :param keep: events kept for replay
    """

    def __init__(self, clock: Any, keep: int = KEEP) -> None:
        self.clock = clock
        self._ring: collections.deque[tuple[int, str]] = collections.deque(maxlen=keep)
        #: The last event's ``seq`` (0 before the first).
        self.seq = 0
        self.readers: set[_Reader] = set()

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
        frame = json.dumps(event, separators=(",", ":"))
        self._ring.append((self.seq, frame))
        for reader in list(self.readers):
            reader.push(frame)

    def after(self, since: int | None) -> list[str]:
        """:return: the frames kept after ``since`` (none when None)"""
        if since is None:
            return []
        return [frame for seq, frame in self._ring if seq > since]

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
