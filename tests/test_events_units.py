"""
The event log in memory, with a Clock: where VM events come from (its registrar around
fake handlers: the proxied ``explorer.call`` and placement's ``explorer.create_vm``),
the frames it encodes once, and a replay's slices and stall.
"""

import json

from twisted.internet import defer
from twisted.internet.task import Clock
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from hero_compute.explorer.events import CLOSE_GRACE, SLICE, STALL, EventLog, _Reader
from hero_compute.rpc.dispatch import CallContext
from hero_compute.rpc.websocket import text_frame


class Recorder:
    """A dispatcher's ``register``: keeps the handlers."""

    def __init__(self):
        self.handlers = {}

    def register(self, name, func, context=False):
        """Keep ``func`` under ``name`` (it must take the context, as wrapped)."""
        assert context
        self.handlers[name] = func


class Reader:
    """A reader of the log: every frame, decoded."""

    def __init__(self):
        self.events = []

    def push(self, frame):
        """Take one frame (a server's text frame: its payload follows a 2-byte head)."""
        assert frame[0] == 0x81 and frame[1] < 126
        self.events.append(json.loads(frame[2:]))


def test_vm_events_from_calls_and_placement():
    """vm.start/stop/delete/create through explorer.call make their events (with the
    VM id and actor), a result in state error makes vm.error, a read or a failure
    makes none, and create_vm makes vm.created on the node it chose."""
    log = EventLog(Clock())
    reader = Reader()
    log.readers.add(reader)
    rpc = Recorder()
    answers = {
        "vm.start": {"vm_id": "v1", "state": "running"},
        "vm.stop": {"vm_id": "v1", "state": "error"},
        "vm.list": [],
        "vm.delete": True,
    }

    def call(node_id, method, params=None):
        if method == "vm.get":
            return defer.fail(ValueError("no"))
        return defer.succeed(answers[method])

    registrar = log.registrar(rpc)
    registrar.register("explorer.call", call)
    registrar.register(
        "explorer.create_vm",
        lambda name, vcpus: {"node_id": "n2", "vm_id": "v9", "name": name},
    )
    unix = CallContext("unix", "unix", uid=1000)
    handle = rpc.handlers["explorer.call"]
    for method in ("vm.start", "vm.stop", "vm.list", "vm.delete"):
        handle(unix, "n1", method, {"vm_id": "v1"})
    failed = handle(unix, "n1", "vm.get", {"vm_id": "v1"})
    failed.addErrback(lambda f: f.trap(ValueError))
    rpc.handlers["explorer.create_vm"](unix, name="web", vcpus=1)
    assert [(e["type"], e.get("node_id"), e.get("vm_id")) for e in reader.events] == [
        ("vm.started", "n1", "v1"),
        ("vm.error", "n1", "v1"),
        ("vm.deleted", "n1", "v1"),
        ("vm.created", "n2", "v9"),
    ]
    assert {e["actor"] for e in reader.events} == {"unix:1000"}
    assert [e["seq"] for e in reader.events] == [1, 2, 3, 4]


def test_text_frame_is_the_frame_wsproto_sends():
    """A frame encoded once for every reader is byte for byte what wsproto's server
    side sends for the same text, at each length form (7-bit, 16-bit, 64-bit)."""
    client, server = (
        WSConnection(ConnectionType.CLIENT),
        WSConnection(ConnectionType.SERVER),
    )
    server.receive_data(client.send(Request(host="x", target="/v1/events")))
    list(server.events())
    server.send(AcceptConnection())
    for size in (5, 125, 126, 300, 65535, 65536, 70000):
        text = "é" * (size // 2) + "x" * (size % 2)
        assert text_frame(text) == server.send(TextMessage(data=text))


class Transport:
    """A connection that can be cut off."""

    connected = True

    def abortConnection(self):
        """Cut off."""
        self.connected = False


class Socket:
    """A WebSocket's side the reader uses: frames written, the close, the hook."""

    def __init__(self):
        self.sent = bytearray()
        self.code = None
        self.writable = None
        self.transport = Transport()

    def send_frames(self, frames):
        """Take frames."""
        self.sent += frames

    def close(self, code, reason):
        """Take the close."""
        self.code = code

    def seqs(self):
        """The seq of every whole frame sent."""
        out, i = [], 0
        while i < len(self.sent):
            size, at = self.sent[i + 1], i + 2
            out.append(json.loads(bytes(self.sent[at : at + size]))["seq"])
            i = at + size
        return out


class Call:
    """A call scheduled for the next turn."""

    def __init__(self, func):
        self.func = func
        self.done = False

    def active(self):
        """Not run or cancelled yet."""
        return not self.done

    def cancel(self):
        """Not to be run."""
        self.done = True


class Turns:
    """A reactor's turns: what is scheduled during one runs at the next (as Twisted's
    reactor does; a Clock runs it at once)."""

    def __init__(self):
        self.pending = []

    def seconds(self):
        """The time (it stands still)."""
        return 0.0

    def callLater(self, delay, func, *args):
        """Schedule ``func`` for the next turn."""
        assert delay == 0
        call = Call(lambda: func(*args))
        self.pending.append(call)
        return call

    def turn(self):
        """Run one turn; :return: whether another is scheduled."""
        pending, self.pending = self.pending, []
        for call in pending:
            if not call.done:
                call.done = True
                call.func()
        return bool(self.pending)


def test_replay_in_slices_meets_the_live_stream_and_a_stuck_replay_is_closed():
    """A replay goes out a slice per reactor turn, events made meanwhile reach the
    reader through it and live ones after it, each once; a replaying reader whose
    connection stays full for STALL seconds is closed with 1008 (and cut later)."""
    turns = Turns()
    log = EventLog(turns, keep=2000)
    for n in range(3000):
        log.emit("node.online", node_id=f"n{n % 7}", data={"n": n})
    socket = Socket()
    _Reader(log, 0).opened(socket)
    sent = [len(socket.sent)]
    while True:
        log.emit("node.online", node_id="meanwhile")
        more = turns.turn()
        sent.append(len(socket.sent))
        if not more:
            break
    assert len(sent) > 5
    # Every turn but the last wrote one slice.
    steps = [b - a for a, b in zip([0, *sent[:-2]], sent[:-1], strict=True)]
    assert all(0 < step < SLICE + 200 for step in steps)
    log.emit("node.online", node_id="live")
    assert socket.seqs() == list(range(1001, log.seq + 1))
    assert socket.code is None

    clock = Clock()
    log.clock = clock

    stuck = Socket()
    reader = _Reader(log, 0)
    reader.opened(stuck)
    socket.writable(False)  # the first reader, live: a full connection only counts
    stuck.writable(False)
    clock.advance(STALL - 0.1)
    log.emit("node.online", node_id="while-full")
    assert stuck.code is None
    clock.advance(0.2)
    assert stuck.code == 1008 and socket.code is None
    assert reader not in log.readers
    clock.advance(CLOSE_GRACE)
    assert not stuck.transport.connected


def test_a_since_past_either_end_of_the_ring():
    """A since beyond the last event reads live only (however large), one before the
    first held event replays all that is held (however negative)."""
    log = EventLog(Clock(), keep=10)
    for n in range(15):
        log.emit("node.online", node_id=f"n{n}")
    ahead, behind = Socket(), Socket()
    _Reader(log, 10**30).opened(ahead)
    _Reader(log, -(10**30)).opened(behind)
    log.emit("node.online", node_id="live")
    assert ahead.seqs() == [16]
    assert behind.seqs() == list(range(6, 17))
