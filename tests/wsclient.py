"""
A blocking WebSocket client for tests (wsproto over a plain socket, deliberately not our
own client): connects over unix:// or tcp:// (or TLS, given an ``ssl`` context), reads
with bounded waits.
"""

import socket
import time

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from hero_compute.rpc.addresses import parse_address


class Refused(Exception):
    """The server answered the upgrade with an HTTP status."""

    def __init__(self, status, body):
        Exception.__init__(self, status, body)
        self.status = status
        self.body = body


class WsClient:
    """
    One WebSocket to ``path`` at ``uri``.

    :param rcvbuf: a small receive buffer, for a client that stops reading
    :param context: an ``ssl.SSLContext`` for a ``tls://`` URI
    :raise Refused: the server refused the upgrade
    """

    def __init__(self, uri, path, timeout=10.0, rcvbuf=None, context=None):
        address = parse_address(uri)
        if address.is_unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = address.path
        else:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            target = (address.host, address.port)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(target)
        if context is not None:
            sock = context.wrap_socket(sock)
        self.sock = sock
        self.timeout = timeout
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.received = bytearray()
        self.pongs = []
        self.close_code = None
        self.closed = False
        self.sock.sendall(self.ws.send(Request(host="localhost", target=path)))
        status, body = None, b""
        deadline = time.monotonic() + timeout
        while True:
            events = self._read_events(deadline)
            for n, event in enumerate(events):
                if isinstance(event, AcceptConnection):
                    # Messages may come in the same read as the answer (a replay).
                    self._handle(events[n + 1 :])
                    return
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise Refused(status, b"")
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        raise Refused(status, body)

    def _read_events(self, deadline):
        self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            raise ConnectionError("closed by the server")
        self.ws.receive_data(data)
        return list(self.ws.events())

    def send(self, data):
        """Send bytes as one binary message."""
        self.sock.sendall(self.ws.send(BytesMessage(data=data)))

    def send_text(self, text):
        """Send one text message."""
        self.sock.sendall(self.ws.send(TextMessage(data=text)))

    def ping(self, payload=b"p"):
        """Send a ping (its pong lands in :attr:`pongs`)."""
        self.sock.sendall(self.ws.send(Ping(payload=payload)))

    def pump(self, deadline):
        """Read what arrives before ``deadline``; False once the server closed."""
        try:
            events = self._read_events(deadline)
        except TimeoutError:
            return True
        except (ConnectionError, OSError):
            self.closed = True
            return False
        self._handle(events)
        return True

    def _handle(self, events):
        for event in events:
            if isinstance(event, BytesMessage):
                self.received += event.data
            elif isinstance(event, TextMessage):
                self.received += event.data.encode()
            elif isinstance(event, Pong):
                self.pongs.append(bytes(event.payload))
            elif isinstance(event, CloseConnection):
                self.close_code = event.code
                if self.ws.state == ConnectionState.REMOTE_CLOSING:
                    try:
                        self.sock.sendall(self.ws.send(event.response()))
                    except OSError:
                        pass

    def read_until(self, needle, timeout=None, start=0):
        """
        Read until ``needle`` is in what was received (from ``start``).

        :return: everything received so far
        :raise AssertionError: not within ``timeout`` seconds
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        while needle not in self.received[start:]:
            if time.monotonic() > deadline or not self.pump(deadline):
                raise AssertionError(
                    f"{needle!r} not received; got {bytes(self.received[-500:])!r}"
                )
        return bytes(self.received)

    def wait_closed(self, timeout=None):
        """:return: whether the server closed within ``timeout`` seconds"""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            if not self.pump(deadline):
                return True
        return False

    def close_handshake(self, code=1000):
        """Start the closing handshake (the server answers and closes)."""
        self.sock.sendall(self.ws.send(CloseConnection(code=code)))

    def close(self, code=1000):
        """Close politely (best effort) and drop the socket."""
        try:
            self.sock.sendall(self.ws.send(CloseConnection(code=code)))
        except Exception:
            pass
        self.sock.close()


def refusal(uri, path, timeout=10.0):
    """:return: the HTTP status the upgrade at ``path`` is refused with (None: accepted)"""
    try:
        client = WsClient(uri, path, timeout)
    except Refused as e:
        return e.status
    client.close()
    return None
