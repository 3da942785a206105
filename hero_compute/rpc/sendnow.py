"""
Send an answer (or a request) at once, instead of at the reactor's next turn.

Twisted's ``transport.write`` only buffers: it registers the socket for writability,
sends when the reactor next polls, then unregisters it.  For a small answer to a peer
that reads (nearly every answer) that is two ``epoll_ctl`` calls, one more trip through
the reactor and the buffer's bookkeeping, about a tenth of a heartbeat's cost on the
explorer.  :func:`send_now` sends what the kernel takes right away and hands only the
rest (if any) to the transport, which then works exactly as before: buffering, the
producer's pause past ``bufferSize``, and reporting a broken connection.

It applies only when the transport's own buffer is empty (so bytes never overtake
bytes) and only to Twisted's plain TCP and Unix transports, server or client side (the
client sends every proxied call's request with it); anything else (a test's transport,
a TLS transport) gets ``transport.write``.

Over TLS the same saving comes from the TLS transport of our listeners
(:mod:`.tls_server`): what OpenSSL makes of a write (the answer's record, and every
handshake flight or alert) goes to the TCP transport under it through :func:`send_now`,
at once, instead of being held for a ``callLater(0)`` to gather small ones (as Twisted's
:class:`~twisted.protocols.tls.BufferingTLSTransport` does; we write one answer at a
time) and then buffered in the TCP transport as above.
"""

from __future__ import annotations

from typing import Any

from .twisted_private import idle_socket


def send_now(transport: Any, data: bytes) -> None:
    """
    Write ``data`` to a connection: what the socket takes at once is sent now, the rest
    is buffered by the transport.

    :param transport: the connection's transport
    :param data: the bytes to send
    """
    sock = idle_socket(transport)
    if sock is not None:
        try:
            sent = sock.send(data)
        except OSError:
            # Full (EAGAIN), or broken: the transport buffers it, or meets the error
            # and closes the connection its own way.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
