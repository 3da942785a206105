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

Over TLS the same saving comes from :class:`SendNowTLS`, the TLS transport of our
listeners: what OpenSSL makes of a write (the answer's record, and every handshake
flight or alert) goes to the TCP transport under it through :func:`send_now`, at once,
instead of through Twisted's :class:`~twisted.protocols.tls.BufferingTLSTransport`,
which holds every write for a ``callLater(0)`` to gather small ones (we write one
answer at a time) and then buffers the ciphertext in the TCP transport as above.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import WantReadError
from twisted.protocols.tls import TLSMemoryBIOProtocol

from .twisted_private import idle_socket, tls_connection

#: Bytes read from OpenSSL's send buffer at a time (Twisted reads as much); a read that
#: returns less has emptied it.
_BIO_READ = 2**15


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


class SendNowTLS(TLSMemoryBIOProtocol):
    """
    Twisted's TLS transport without its aggregation of small writes, sending its
    ciphertext with :func:`send_now`: a write is encrypted and, if the socket takes it,
    sent before it returns.

    Everything else (handshake, reads, shutdown, producers) is
    :class:`~twisted.protocols.tls.TLSMemoryBIOProtocol`'s.  All of its ciphertext
    leaves through ``_flushSendBIO`` (``tests/test_sendnow.py`` fails if that stops
    being so: the answers then wait for the reactor again, but stay correct and in
    order, as the TCP transport under us is only ever written to from here).
    """

    def _flushSendBIO(self) -> None:
        connection = tls_connection(self)
        try:
            data = connection.bio_read(_BIO_READ)
        except WantReadError:
            return  # nothing to send: OpenSSL made no record
        if len(data) == _BIO_READ:
            chunks = [data]
            while len(data) == _BIO_READ:
                try:
                    data = connection.bio_read(_BIO_READ)
                except WantReadError:
                    break
                chunks.append(data)
            data = b"".join(chunks)
        send_now(self.transport, data)
