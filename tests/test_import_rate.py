"""
The minimum rate of an image import (red team finding 7b): a real HTTP server on
loopback that answers 200 with a big Content-Length, then drips a byte at a time, is
never idle, yet must not hold an import slot for good.  Below the minimum average rate
over a window (short, injected here) the import fails "too slow", its partial file is
removed and its slot is free again.
"""

import hashlib
import http.server
import os
import threading
import time

import pytest
import pytest_twisted

from hero_compute.node.fetch import MIN_RATE, RATE_WINDOW
from hero_compute.node.images import Images
from hero_compute.rpc.errors import RpcError

#: Seconds between the dripping server's bytes.
DRIP = 0.05


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
