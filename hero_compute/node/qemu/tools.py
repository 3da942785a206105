"""
Running QEMU's short-lived tools (``qemu-img``, QEMU until it daemonizes) with a deadline
that ends the process, not only the wait.

Twisted's ``getProcessOutputAndValue`` gives a Deferred that cannot be cancelled: a
timeout on it stops the waiting but leaves the process running.  A base image is a
user's file, and ``qemu-img info`` follows what it names: a VMDK extent or a backing file
that is a FIFO makes it block for ever, so every run here is killed at its deadline.
"""

import os
import signal
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, error, protocol


class ToolTimeout(Exception):
    """The tool did not finish in time and was killed."""


class _Collect(protocol.ProcessProtocol):
    def __init__(self, done):
        self.done = done
        self.out = []
        self.err = []
        self.timed_out = False

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        if self.timed_out:
            self.done.errback(ToolTimeout())
        else:
            code = getattr(reason.value, "exitCode", None)
            self.done.callback((b"".join(self.out), b"".join(self.err), code))


def run(
    reactor: Any,
    executable: str,
    args: Sequence[str],
    timeout: float,
    path: str | None = None,
) -> defer.Deferred[tuple[bytes, bytes, int | None]]:
    """
    Run a tool to its end, or kill it at ``timeout``.

    :param reactor: provides ``IReactorProcess`` and ``IReactorTime``
    :param executable: the tool
    :param args: its arguments (after the executable)
    :param timeout: seconds it may take; then it gets ``SIGKILL``
    :param path: its working directory, or ``None`` for ours
    :return: a Deferred firing with ``(stdout, stderr, exit code)``, or failing with
        :class:`ToolTimeout` once the killed process has ended
    """
    done: defer.Deferred[tuple[bytes, bytes, int | None]] = defer.Deferred()
    collect = _Collect(done)
    process = reactor.spawnProcess(
        collect, executable, [executable, *args], env=os.environ, path=path
    )

    def kill():
        collect.timed_out = True
        try:
            process.signalProcess(signal.SIGKILL)
        except error.ProcessExitedAlready:
            pass

    deadline = reactor.callLater(timeout, kill)

    def finished(result):
        if deadline.active():
            deadline.cancel()
        return result

    return done.addBoth(finished)
