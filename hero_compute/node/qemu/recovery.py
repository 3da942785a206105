"""
What a node finds when it starts: VMs whose QEMU still runs (taken back over QMP), VMs
whose QEMU died while the node was down (marked stopped), and taps such VMs left behind.
The manager owns the states; these functions only walk its machines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer

from . import access

if TYPE_CHECKING:
    from .machine import Machine


def recover_all(
    reactor: Any, machines: Iterable[Machine], set_state: Callable[[Machine, str], object]
) -> defer.Deferred[None]:
    """
    Take back every VM that was starting, running or stopping, then remove the taps of
    every VM that does not run.

    :param reactor: provides ``IReactorProcess``
    :param machines: the manager's :class:`~.machine.Machine` s
    :param set_state: the manager's ``_set_state(machine, state)``
    :return: a Deferred firing (with ``None``, never failing) once all is done
    """
    machines = list(machines)
    recoveries = [
        vm.lock.run(_recovering, vm, set_state)
        for vm in machines
        if vm.record.state in ("starting", "running", "stopping")
    ]
    d = defer.DeferredList(recoveries, consumeErrors=True)
    d.addCallback(lambda _: release_stopped(reactor, machines))
    return d.addCallback(lambda _: None)


async def _recover(vm, set_state) -> None:
    if vm.pid() is not None:
        # Ours, alive: whatever state we crashed in, it runs now, and losing QMP from
        # here on is an error as for any running VM.
        vm.record = attrs.evolve(vm.record, state="running")
    state = await vm.recover(10)
    # Saved even when unchanged in memory: "starting" or "stopping" may be on disk.
    set_state(vm, "error" if vm.record.state == "error" else state)


def _recovering(
    vm: Machine, set_state: Callable[[Machine, str], object]
) -> defer.Deferred[None]:
    return defer.Deferred.fromCoroutine(_recover(vm, set_state))


def release_stopped(reactor: Any, machines: Iterable[Machine]) -> defer.Deferred[Any]:
    """
    Remove the taps a crash (of the node, or of QEMU while the node was down) left
    behind for VMs that do not run.

    :return: a Deferred firing once done
    """
    releases = [
        defer.Deferred.fromCoroutine(access.release(reactor, vm.record))
        for vm in machines
        if vm.record.state != "running"
    ]
    return defer.DeferredList(releases, consumeErrors=True)


def observe(d: defer.Deferred[Any] | None) -> defer.Deferred[None]:
    """
    :param d: a Deferred that fires with ``None``, or ``None``
    :return: a new Deferred firing with ``None`` when ``d`` has, leaving ``d``'s own
        result alone
    """
    if d is None:
        return defer.succeed(None)
    observer: defer.Deferred = defer.Deferred()

    def done(result):
        observer.callback(None)
        return result

    d.addBoth(done)
    return observer
