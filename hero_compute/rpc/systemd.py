"""
systemd integration without a dependency: ``sd_notify`` (``Type=notify``: READY=1 once
the listeners are bound, STOPPING=1, WATCHDOG=1 pings).  Socket activation is Twisted's
own ``systemd:`` server endpoint.

The protocol is one datagram of ``KEY=VALUE`` lines to the ``AF_UNIX`` socket named by
``NOTIFY_SOCKET`` (a leading ``@`` is the abstract namespace); see sd_notify(3).  The
callers pass the environment in; nothing here reads ``os.environ`` by itself.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


def notify(env: Mapping[str, str], *lines: str) -> bool:
    """
    Send one sd_notify message.

    :param env: the environment, holding ``NOTIFY_SOCKET`` under a service manager
    :param lines: ``KEY=VALUE`` assignments, e.g. ``READY=1``
    :return: whether a message was sent (False when not under a service manager, or
        when the socket cannot take it: a notification never stops the service)
    """
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError as e:
        log.warn("sd_notify to {address} failed: {error}", address=address, error=e)
        return False
    return True


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """
    Seconds between watchdog pings: half of ``WATCHDOG_USEC`` as sd_watchdog_enabled(3)
    advises, or None when the watchdog is off or meant for another process.
    """
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        owner = int(env.get("WATCHDOG_PID") or pid)
    except ValueError:
        return None
    if usec <= 0 or owner != pid:
        return None
    return usec / 2e6


class Notifier(service.Service):
    """
    Tells the service manager how the process is doing: ``READY=1`` once the reactor
    runs (every listener bound by then: one that cannot bind aborts start-up before),
    ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` from the reactor (so a wedged reactor
    is restarted), ``STOPPING=1`` as soon as shutdown begins.

    :param reactor: the reactor (``callWhenRunning``, system event triggers, time)
    :param env: the environment (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``WATCHDOG_PID``)
    :param status: a callable giving the one-line ``STATUS=`` sent with READY=1
    :param pid: this process's id, ``os.getpid()`` by default
    """

    def __init__(
        self,
        reactor: Any,
        env: Mapping[str, str],
        status: Any = None,
        pid: int | None = None,
    ) -> None:
        self._reactor = reactor
        self._env = dict(env)
        self._status = status
        self._pid = os.getpid() if pid is None else pid
        self._watchdog: LoopingCall | None = None
        self._trigger: Any = None
        self._stopping = False

    def startService(self) -> None:
        service.Service.startService(self)
        self._stopping = False
        self._reactor.callWhenRunning(self._ready)
        # Before twistd's own trigger stops the services (a node says goodbye to its
        # explorers first, for up to 2 s): the manager knows at once that we stop.
        self._trigger = self._reactor.addSystemEventTrigger(
            "before", "shutdown", self._stop_notice
        )

    def _ready(self) -> None:
        if not self.running:
            return
        lines = ["READY=1", f"MAINPID={self._pid}"]
        if self._status is not None:
            lines.append(f"STATUS={self._status()}")
        notify(self._env, *lines)
        interval = watchdog_interval(self._env, self._pid)
        if interval is not None:
            self._watchdog = LoopingCall(notify, self._env, "WATCHDOG=1")
            self._watchdog.clock = self._reactor
            self._watchdog.start(interval, now=True)

    def _stop_notice(self) -> None:
        if not self._stopping:
            self._stopping = True
            notify(self._env, "STOPPING=1")

    def stopService(self) -> None:
        self._stop_notice()
        if self._trigger is not None:
            try:
                self._reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError):
                pass  # it has fired
            self._trigger = None
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        service.Service.stopService(self)


def notifier_for(reactor: Any, env: Mapping[str, str], listeners: Any) -> Notifier:
    """
    The :class:`Notifier` of a process, named ``systemd``, its READY=1 status naming
    its listeners.

    :param listeners: the :class:`~hero_compute.rpc.listeners.Listeners`
    """
    notifier = Notifier(
        reactor, env, status=lambda: "listening on " + ", ".join(listeners.bound)
    )
    notifier.setName("systemd")
    return notifier
