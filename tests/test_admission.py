"""
Admission at accept (CONTRACT §7) on the ``twisted.web`` listeners, the dashboard and the
metrics page, against a real ``twistd explorer`` from the attacker's side; and the
bookkeeping of :class:`~hero_compute.rpc.admission.Admission` in memory.
"""

import socket
import time

import pytest
from twisted.internet.task import Clock

from hero_compute.rpc.admission import Admission
from hero_compute.rpc.limits import Limits

from .support import rpc, wait_for


def test_siblings_count_per_address_apart_and_share_the_rest():
    """A sibling (the dashboard's, the metrics page's) has its own per-address count but
    the same descriptor count and refusal counters; release undoes admit."""
    rpc_side = Admission(Limits(max_conns_per_addr=2), Clock())
    ui_side = rpc_side.sibling()
    assert rpc_side.admit("10.0.0.1") and rpc_side.admit("10.0.0.1")
    assert not rpc_side.admit("10.0.0.1")
    assert ui_side.admit("10.0.0.1")
    assert rpc_side.admit(None)  # a Unix connection: never limited per address
    assert rpc_side.per_host == {"10.0.0.1": 2} and ui_side.per_host == {"10.0.0.1": 1}
    assert rpc_side.descriptors is ui_side.descriptors
    assert rpc_side.descriptors.open == 4 and rpc_side.open == 3 and ui_side.open == 1
    assert rpc_side.refusals["max_conns_per_addr"] == 1
    assert ui_side.refusals is rpc_side.refusals
    for host in ("10.0.0.1", "10.0.0.1", None):
        rpc_side.release(host)
    ui_side.release("10.0.0.1")
    assert rpc_side.per_host == {} and ui_side.per_host == {}
    assert rpc_side.descriptors.open == 0


def test_descriptor_reserve_refuses_tcp_not_unix():
    """Past the reserve, TCP connections are refused and counted; Unix ones still pass."""
    admission = Admission(Limits(fd_reserve=64), Clock())
    descriptors = admission.descriptors
    descriptors._limit = 100
    descriptors._counted_at = float("inf")  # the count below stands
    descriptors._in_use = 40
    assert not admission.admit("10.0.0.1")
    assert admission.refusals["fd_reserve"] == 1
    assert admission.admit(None)


@pytest.fixture
def explorer(twistd, short_tmp):
    """``explorer(**variables)``: a real explorer with its dashboard and metrics page on
    plain TCP (127.0.0.1); ``.ui``, ``.metrics`` (ports) and ``.unix`` are set."""

    def start(**variables):
        sock = f"{short_tmp}/e.sock"
        process = twistd(
            ["explorer", "--socket", sock],
            env={
                "EXPLORER_STATE_DIR": f"{short_tmp}/state",
                "EXPLORER_UI_ADDR": "127.0.0.1:0",
                "EXPLORER_METRICS_ADDR": "127.0.0.1:0",
                **{k: str(v) for k, v in variables.items()},
            },
        )
        (ui,) = process.wait_for_line(r"dashboard: http://127\.0\.0\.1:(\d+)/")
        (metrics,) = process.wait_for_line(r"listening on tcp://127\.0\.0\.1:(\d+) \(Prom")
        process.ui, process.metrics = int(ui.group(1)), int(metrics.group(1))
        process.unix = f"unix://{sock}"
        return process

    return start


def closed_within(sock, timeout):
    """:return: ``(bytes read, seconds until closed)``; seconds None if still open"""
    started = time.monotonic()
    data = b""
    sock.settimeout(0.05)
    while time.monotonic() - started < timeout:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - started
        if not chunk:
            return data, time.monotonic() - started
        data += chunk
    return data, None


def answered(port, path="/"):
    """Whether a plain GET on ``port`` gets an HTTP answer."""
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode())
        sock.settimeout(5)
        return sock.recv(65536).startswith(b"HTTP/1.1 ")


@pytest.mark.parametrize("listener", ["ui", "metrics"])
def test_trickled_head_is_408_at_the_head_deadline(explorer, listener):
    """
    With HERO_HEAD_TIMEOUT=1, a head sent one byte every 0.3 s to the dashboard or the
    metrics page (whose idle timeout, reset by each byte, would keep it for ever) is
    answered 408 and closed about a second after its first byte; others are served.
    """
    process = explorer(HERO_HEAD_TIMEOUT=1)
    port = getattr(process, listener)
    sock = socket.create_connection(("127.0.0.1", port), 5)
    started = time.monotonic()
    sock.settimeout(0.3)
    data = b""
    try:
        for byte in b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 30:
            try:
                sock.send(bytes([byte]))
                data += sock.recv(65536)
                break  # answered (or closed)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        rest, _ = closed_within(sock, 3)
        data += rest
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert time.monotonic() - started < 3.0
    assert answered(port, "/metrics" if listener == "metrics" else "/")
    assert "result" in rpc(process.unix, "explorer.info")


@pytest.mark.parametrize("listener", ["ui", "metrics"])
def test_connections_per_address_are_capped_on_web_listeners(explorer, listener):
    """
    HERO_MAX_CONNS_PER_ADDR=10: the dashboard and the metrics page keep ten connections
    from 127.0.0.1 and close the rest at accept; 127.0.0.2 is served meanwhile.
    """
    process = explorer(HERO_MAX_CONNS_PER_ADDR=10)
    port = getattr(process, listener)
    kept = [socket.create_connection(("127.0.0.1", port), 5) for _ in range(10)]
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), 5) as extra:
                data, closed = closed_within(extra, 5)
                assert closed is not None and data == b"", (data, closed)
        other = socket.socket()
        other.bind(("127.0.0.2", 0))
        other.connect(("127.0.0.1", port))
        other.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        other.settimeout(5)
        assert other.recv(65536).startswith(b"HTTP/1.1 ")
        other.close()
    finally:
        for sock in kept:
            sock.close()
    process.wait_for_line(r"refused \(max_conns_per_addr\) a connection from 127\.0\.0\.1")
    wait_for(lambda: answered(port), 5, what="127.0.0.1 served again")
