"""
The only module that reads (or sets) Twisted's private attributes.

Each function names what we need from Twisted's internals and why; should Twisted
rename one, this is the one place to follow it (``tests/test_sendnow.py``,
``tests/test_hostile_tls.py`` and ``tests/test_listeners.py`` fail if one goes missing).
Everything else imports from here.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import tcp, unix

#: The transports whose socket we may write to directly: Twisted's own, whose buffer
#: attributes (``dataBuffer``, ``_tempDataLen``) we read to keep the order of bytes.
_DIRECT = (tcp.Server, unix.Server, tcp.Client, unix.Client)


def idle_socket(transport: Any) -> socket.socket | None:
    """
    The socket under one of Twisted's plain TCP or Unix transports when nothing of
    ours waits in its buffer, so that bytes written to it directly cannot overtake
    bytes already written; None otherwise (another transport, a buffer holding data,
    a connection closing).

    :param transport: a connection's transport
    """
    if (
        type(transport) in _DIRECT
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.dataBuffer
        and not transport._tempDataLen
    ):
        sock: socket.socket = transport.socket
        return sock
    return None


def raise_bind_errors(svc: StreamServerEndpointService) -> None:
    """
    Make a listener's bind failure raise from ``privilegedStartService`` (so twistd
    exits) instead of being logged, as :obj:`twisted.application.strports.service`
    does.

    :param svc: the listener's service
    """
    svc._raiseSynchronously = True


def lean_poll(reactor: Any) -> bool:
    """
    Have Twisted's epoll reactor hand each ready descriptor to ``_doReadOrWrite``
    directly, as its own ``doPoll`` does but without wrapping every event in
    ``log.callWithLogger``: that pushes and pops a copy of the legacy log context
    (``{"system": logPrefix()}``) around each read, seven Python calls of ~150 a proxied
    call makes in the explorer, for a tag only the legacy ``log.msg``/``log.err`` show
    (our own lines carry their logger's namespace).  ``_doReadOrWrite`` still catches
    and logs whatever a read or write raises, and disconnects that descriptor.

    :param reactor: the reactor; anything but an epoll reactor is left as it is
    :return: whether it was changed
    """
    from twisted.internet.epollreactor import EPollReactor
    from twisted.python import log

    if not isinstance(reactor, EPollReactor):
        return False
    poll = reactor._poller.poll
    selectables = reactor._selectables
    # Looked up now, so that a tracer patching the class before start (the bench's
    # stall tracer) is the one called.
    handle = reactor._doReadOrWrite

    def doPoll(timeout: float | None) -> None:
        try:
            events = poll(-1 if timeout is None else timeout, len(selectables))
        except InterruptedError:
            return
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    handle(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    # What callWithLogger did: a connectionLost that raises is logged
                    # and the other ready descriptors are still served this turn.
                    log.err(None, "while handling a ready descriptor")

    patched: Any = reactor
    patched.doPoll = patched.doIteration = doPoll
    return True
