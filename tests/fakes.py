"""
In-memory stand-ins for the seams of hero_compute, each checked against its interface
with ``verifyObject`` in ``tests/test_fakes.py``.
"""

import attrs
from twisted.internet import defer
from zope.interface import implementer

from hero_compute.node.vms import IVmManager, VmRecord, usage_of
from hero_compute.rpc.errors import (
    ConnectionRefused,
    InvalidVmState,
    RefusedByPolicy,
    VmNotFound,
)
from hero_compute.rpc.interfaces import IRpcClient


@implementer(IVmManager)
@attrs.define
class MemoryVmManager:
    """
    An in-memory :class:`IVmManager`: the lifecycle rules without any process behind
    them.

    :ivar clock: an ``IReactorTime`` for ``created_at``
    :ivar host: the capacity to report
    """

    clock: object
    host: dict = attrs.field(factory=lambda: {"vcpus": 0, "memory_mb": 0, "disk_gb": 0})
    _vms: dict = attrs.field(factory=dict)
    _next: int = 0

    def create(self, name, vcpus, memory_mb, disk_gb, image=None, **access):
        self._next += 1
        vm = VmRecord(
            f"vm-{self._next}",
            name,
            vcpus,
            memory_mb,
            disk_gb,
            image,
            "stopped",
            self.clock.seconds(),
        )
        self._vms[vm.vm_id] = vm
        return defer.succeed(vm)

    def _transition(self, vm_id, allowed, new_state):
        vm = self._get(vm_id)
        if vm.state not in allowed:
            raise InvalidVmState(f"VM {vm_id} is {vm.state}")
        vm = self._vms[vm_id] = attrs.evolve(vm, state=new_state)
        return vm

    def start(self, vm_id):
        return defer.maybeDeferred(self._transition, vm_id, ("stopped", "error"), "running")

    def stop(self, vm_id, force=False):
        return defer.maybeDeferred(
            self._transition, vm_id, ("running", "starting"), "stopped"
        )

    def delete(self, vm_id):
        return defer.maybeDeferred(lambda: bool(self._vms.pop(self._get(vm_id).vm_id)))

    def get(self, vm_id):
        return defer.maybeDeferred(self._get, vm_id)

    def _get(self, vm_id):
        try:
            return self._vms[vm_id]
        except KeyError:
            raise VmNotFound(f"no VM {vm_id!r}") from None

    def list(self):
        return defer.succeed(list(self._vms.values()))

    def capacity(self):
        return dict(self.host)

    def accel(self):
        return "tcg"

    def usage(self):
        return usage_of(self._vms.values())


@implementer(IRpcClient)
@attrs.define
class FakeRpcClient:
    """
    An :class:`IRpcClient` whose peers are up or down, answering at once or never.

    :ivar calls: ``(uri, method, params, timeout)`` of every call and notification
    :ivar down: URIs that refuse connections
    :ivar hang: URIs that never answer
    :ivar refuse: URIs that answer with a -32010 error
    :ivar answer: the result of a call to a peer that is up
    :ivar host: the address :meth:`local_host` reports
    :ivar tls: what :meth:`use_tls` was given
    :ivar retired: how many times connections were retired
    """

    timeout: float = 10.0
    calls: list = attrs.field(factory=list)
    down: set = attrs.field(factory=set)
    hang: set = attrs.field(factory=set)
    refuse: set = attrs.field(factory=set)
    answer: object = attrs.field(factory=lambda: {"accepted": True, "next_heartbeat": 10})
    host: str = "127.0.0.1"
    closed: bool = False
    tls: object = None
    retired: int = 0

    def call(self, address, method, params=None, timeout=None, expect=None):
        self.calls.append((address.uri, method, params, timeout))
        if address.uri in self.down:
            return defer.fail(ConnectionRefused(address, "refused"))
        if address.uri in self.refuse:
            return defer.fail(RefusedByPolicy("no"))
        if address.uri in self.hang:
            return defer.Deferred()
        return defer.succeed(self.answer)

    def notify(self, address, method, params=None, timeout=None, expect=None):
        return self.call(address, method, params, timeout).addCallback(lambda _: None)

    def local_host(self, address, timeout=None):
        if address.uri in self.down:
            return defer.fail(ConnectionRefused(address, "refused"))
        if address.uri in self.hang:
            return defer.Deferred()
        return defer.succeed(self.host)

    def use_tls(self, tls):
        self.tls = tls
        self.retired += 1

    def retire_connections(self):
        self.retired += 1

    def close(self):
        self.closed = True
        return defer.succeed(None)
