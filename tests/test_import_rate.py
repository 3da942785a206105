"""
The minimum rate of an image import (red team finding 7b): a real HTTP server on
loopback that answers 200 with a big Content-Length, then drips a byte at a time, is
never idle, yet must not hold an import slot for good.  Below the minimum average rate
over a window (short, injected here) the import fails "too slow", its partial file is
removed and its slot is free again.  Likewise a server that accepts and never answers,
or drips its response head, fails the import once the time to the head (from the
request, redirects included) is over its deadline.
"""

import hashlib
import http.server
import os
import socket
import threading
import time

import pytest
import pytest_twisted

from hero_compute.node.fetch import HEAD_TIMEOUT, MIN_RATE, RATE_WINDOW
from hero_compute.node.images import Images
from hero_compute.rpc.errors import RpcError

#: Seconds between the dripping server's bytes.
DRIP = 0.05

#: The deadline to the response head injected here, and how late ``/to/`` redirects.
HEAD_DEADLINE = 2.0
REDIRECT_DELAY = 1.5


class DripServer:
    """
    On 127.0.0.1: ``/drip`` announces 20 GiB and sends one byte every :data:`DRIP`
    seconds until the client goes or the server is closed; ``/fast/N`` sends N bytes
    at once.
    """

    def __init__(self):
        self._closed = threading.Event()
        self.dripped = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.startswith("/to/"):
                    # A redirect answered late: its wait counts in the head's deadline.
                    if server._closed.wait(REDIRECT_DELAY):
                        return
                    self.send_response(302)
                    self.send_header("Location", "http://" + self.path[len("/to/") :])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                if self.path.startswith("/fast/"):
                    data = b"x" * int(self.path.rsplit("/", 1)[1])
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_header("Content-Length", str(20 << 30))
                self.end_headers()
                # Bounded: at most 60 s of drip, whatever the client does.
                for _ in range(int(60 / DRIP)):
                    if server._closed.wait(DRIP):
                        return
                    try:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    except OSError:
                        return
                    server.dripped += 1

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        """Stop serving; a drip in progress ends."""
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def drip():
    """The dripping server, closed at the end."""
    server = DripServer()
    yield server
    server.close()


def test_default_minimum_rate():
    """By default an import must average 1 KiB/s over each 30 s."""
    assert (MIN_RATE, RATE_WINDOW) == (1024, 30)


async def _until(predicate, timeout):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_dripping_server_fails_too_slow_and_frees_its_slot(drip, tmp_path):
    """Two imports from a server dripping 20 bytes/s, under a minimum of 200 bytes/s
    over 0.5 s, fail "too slow" well before the idle timeout: no partial file is left,
    and both slots take new imports; a fast body passes the same minimum."""
    from twisted.internet import reactor

    images = tmp_path / "images"
    store = Images(
        reactor, [str(images)], allow_local=True, idle=60, min_rate=200, rate_window=0.5
    )
    try:
        await _imports(store, drip, images)
    finally:
        await store.stopService()


async def _imports(store, drip, images):
    started = time.monotonic()
    for name in ("a", "b"):
        answer = await store.start(f"{drip.url}/drip", name, "0" * 64)
        assert answer == {"name": name, "state": "importing"}
    with pytest.raises(RpcError, match="2 imports are running"):
        await store.start(f"{drip.url}/drip", "third", "0" * 64)
    assert sorted(store.importing) == ["a", "b"]
    await _until(lambda: not store.importing, timeout=10)
    assert time.monotonic() - started < 5
    for name in ("a", "b"):
        error = store.failed[name]["error"]
        assert error.startswith("too slow: ") and "the least is 200 bytes/s" in error
    assert os.listdir(images) == []
    assert 0 < drip.dripped < 200
    # The slots are free: two more start, and a body fast enough is not cut.
    body = 64 * 1024
    digest = hashlib.sha256(b"x" * body).hexdigest()
    assert await store.start(f"{drip.url}/fast/{body}", "c", digest)
    assert await store.start(f"{drip.url}/drip", "d", "0" * 64)
    await _until(lambda: not store.importing, timeout=10)
    assert "c" not in store.failed and os.path.getsize(images / "c") == body
    assert store.failed["d"]["error"].startswith("too slow: ")
    assert sorted(os.listdir(images)) == ["c"]


class HeadServer:
    """
    On 127.0.0.1: accepts connections and never answers (``drip=False``), or sends a
    200 response head one byte a second (``drip=True``); each connection for at most
    60 s, until the client goes or the server is closed.
    """

    HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"

    def __init__(self, drip):
        self._drip = drip
        self._closed = threading.Event()
        self.accepted = 0
        self.sent = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.url = f"http://{self.address}/image"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            if not self._drip:
                self._closed.wait(60)
                return
            for byte in self.HEAD[:60]:
                if self._closed.wait(1.0):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                self.sent += 1

    def close(self):
        """Stop accepting; connections held end."""
        self._closed.set()
        self._listener.close()


@pytest.fixture
def silent():
    """A server that accepts and never answers, closed at the end."""
    server = HeadServer(drip=False)
    yield server
    server.close()


@pytest.fixture
def slow_head():
    """A server dripping its response head a byte a second, closed at the end."""
    server = HeadServer(drip=True)
    yield server
    server.close()


def test_default_head_timeout():
    """By default an import must have its response head within 30 s."""
    assert HEAD_TIMEOUT == 30


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_no_response_head_fails_and_frees_its_slot(drip, silent, slow_head, tmp_path):
    """Imports from a server that accepts and never answers, and from one that drips
    its head a byte a second, both fail "no response within 2 s" after the deadline
    (never idle, the drip is not reset by its bytes); a redirect hop answered late
    counts in the same deadline, as does a TLS handshake never answered; no file is
    left, and the slots take new imports."""
    from twisted.internet import reactor

    images = tmp_path / "images"
    store = Images(reactor, [str(images)], allow_local=True, head_timeout=HEAD_DEADLINE)
    try:
        await _no_head(store, drip, silent, slow_head, images)
    finally:
        await store.stopService()


async def _failed_within(store, names, low, high):
    started = time.monotonic()
    await _until(lambda: not store.importing, timeout=10)
    took = time.monotonic() - started
    assert low <= took < high, took
    for name in names:
        assert store.failed[name]["error"] == "no response within 2 s"


async def _no_head(store, drip, silent, slow_head, images):
    for name, server in (("a", silent), ("b", slow_head)):
        answer = await store.start(server.url, name, "0" * 64)
        assert answer == {"name": name, "state": "importing"}
    with pytest.raises(RpcError, match="2 imports are running"):
        await store.start(drip.url + "/fast/1", "third", "0" * 64)
    await _failed_within(store, "ab", HEAD_DEADLINE - 0.2, HEAD_DEADLINE + 2)
    assert silent.accepted == 1 and slow_head.accepted == 1
    assert 0 < slow_head.sent < 5
    assert os.listdir(images) == []
    # The deadline runs from the first request, not from each hop: 1.5 s to the
    # redirect, then silence, fails 2 s after the start (per hop, it would be 3.5 s).
    await store.start(f"{drip.url}/to/{silent.address}/image", "c", "0" * 64)
    await _failed_within(store, "c", HEAD_DEADLINE - 0.2, HEAD_DEADLINE + 1.2)
    assert silent.accepted == 2
    # A TLS handshake that never gets an answer is bounded the same way.
    await store.start(silent.url.replace("http:", "https:"), "e", "0" * 64)
    await _failed_within(store, "e", HEAD_DEADLINE - 0.2, HEAD_DEADLINE + 2)
    assert silent.accepted == 3 and os.listdir(images) == []
    body = 1024
    digest = hashlib.sha256(b"x" * body).hexdigest()
    assert await store.start(f"{drip.url}/fast/{body}", "d", digest)
    await _until(lambda: not store.importing, timeout=10)
    assert "d" not in store.failed and sorted(os.listdir(images)) == ["d"]


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_stopping_node_ends_import_waiting_for_head(silent, tmp_path):
    """A node stopping while an import waits for a response head that never comes
    stops at once: the import fails "the node stopped", no file is left."""
    from twisted.internet import reactor

    images = tmp_path / "images"
    store = Images(reactor, [str(images)], allow_local=True, head_timeout=60)
    store.startService()
    await store.start(silent.url, "a", "0" * 64)
    await _until(lambda: silent.accepted == 1, timeout=5)
    started = time.monotonic()
    await store.stopService()
    assert time.monotonic() - started < 2
    assert store.failed["a"]["error"] == "the node stopped during the import"
    assert not store.importing and os.listdir(images) == []
