"""
Where VM events come from, in memory: the event log's registrar around fake handlers
(the proxied ``explorer.call`` and placement's ``explorer.create_vm``), with a Clock.
"""

import json

from twisted.internet import defer
from twisted.internet.task import Clock

from hero_compute.explorer.events import EventLog
from hero_compute.rpc.dispatch import CallContext


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
        """Take one frame."""
        self.events.append(json.loads(frame))


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
