"""
The JSON-RPC server at the HTTP level: paths, verbs, body limits, persistent and idle
connections, internal errors that do not leak, params validation against a schema and
``rpc.discover``.

Most tests run against the real spec server (a subprocess) over real sockets; those that
need a schema or a short idle timeout serve in-process on a real Unix socket, with the
blocking HTTP client in a thread.  A few protocol details are checked in memory, with
an injected clock.  The dispatcher alone is tested in ``test_dispatch``.
"""

import json
import os
import socket
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from hero_compute.rpc.addresses import parse_address
from hero_compute.rpc.dispatch import Dispatcher
from hero_compute.rpc.http_server import LINGER, MAX_BODY, RpcHTTPFactory, make_factory
from hero_compute.rpc.listen import Listen
from hero_compute.rpc.listeners import Listeners
from hero_compute.rpc.schema import load_schema, parse_schema

from .support import connect, post, until, wait_for

SUM = {"jsonrpc": "2.0", "method": "sum", "params": [1, 2], "id": 7}


def assert_serving(uri):
    """The server still answers a good request on a new connection."""
    status, _, data = post(uri, SUM)
    assert status == 200
    assert json.loads(data) == {"jsonrpc": "2.0", "result": 3, "id": 7}


def raw_socket(uri, timeout=5.0):
    """A connected plain socket to a unix:// or tcp:// URI."""
    address = parse_address(uri)
    if address.is_unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = address.path
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in address.host else socket.AF_INET)
        target = (address.host, address.port)
    sock.settimeout(timeout)
    sock.connect(target)
    return sock


def read_until_closed(sock, limit=1 << 20):
    """
    Everything the peer sends until it closes.

    :raise AssertionError: when the peer does not close within the socket's timeout
    """
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(
                f"the server did not close; got {b''.join(chunks)!r}"
            ) from None
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        assert sum(map(len, chunks)) < limit


def rpc_body(value):
    """A JSON-RPC response body, decoded."""
    return json.loads(value)


# Paths and verbs ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/other", "/rpc/extra", "/rpcx", "/RPC"])
def test_other_paths_are_404(uri, path):
    """Any path but /rpc is 404, and the server goes on serving."""
    status, _, _ = post(uri, SUM, path=path)
    assert status == 404
    assert_serving(uri)


@pytest.mark.parametrize("verb", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_verbs_are_405(uri, verb):
    """Any verb but POST on /rpc is 405, with an Allow header offering POST."""
    status, headers, _ = post(uri, None if verb == "GET" else SUM, method=verb)
    assert status == 405
    assert "POST" in [m.strip() for m in headers["Allow"].split(",")]
    assert_serving(uri)


def test_head_is_405_not_500(uri):
    """HEAD /rpc is refused like GET (405), not a server error."""
    status, headers, _ = post(uri, None, method="HEAD")
    assert status == 405
    assert "POST" in headers["Allow"]
    assert_serving(uri)


# Body limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [MAX_BODY + 1, 10 * 1024**3])
def test_declared_oversize_is_413_without_the_body(uri, length):
    """A Content-Length over 1 MiB is answered 413 from the headers alone, and the
    connection is closed."""
    sock = raw_socket(uri)
    try:
        sock.sendall(
            b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % length
        )
        response = read_until_closed(sock)
    finally:
        sock.close()
    assert response.startswith(b"HTTP/1.1 413 ")
    assert_serving(uri)


@pytest.mark.parametrize("size", [MAX_BODY + 1, 8 * MAX_BODY])
def test_oversize_body_sent_anyway_still_gets_413(uri, size):
    """A client that sends its oversized body before reading still reads the 413 (the
    server drains instead of resetting the connection under it)."""
    status, headers, _ = post(uri, b" " * size)
    assert status == 413
    assert headers["Connection"] == "close"
    assert_serving(uri)


def test_chunked_oversize_is_413(uri):
    """A chunked body that grows past 1 MiB is refused with 413 as soon as it does, and
    the connection closed."""
    sock = raw_socket(uri)
    chunk = b" " * 65536
    try:
        sock.sendall(
            b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        sent = 0
        while sent <= MAX_BODY:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        response = read_until_closed(sock)
    finally:
        sock.close()
    assert response.startswith(b"HTTP/1.1 413 ")
    assert_serving(uri)


def test_chunked_small_body_is_served(uri):
    """A chunked body under the limit is read whole and answered."""
    sock = raw_socket(uri)
    body = json.dumps(SUM).encode()
    try:
        sock.sendall(
            b"POST /rpc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (5, body[:5])
            + b"%x\r\n%s\r\n" % (len(body) - 5, body[5:])
            + b"0\r\n\r\n"
        )
        response = read_until_closed(sock)
    finally:
        sock.close()
    assert response.startswith(b"HTTP/1.1 200 ")
    assert rpc_body(response.split(b"\r\n\r\n", 1)[1])["result"] == 3


def test_body_of_exactly_the_limit_is_served(uri):
    """A body of exactly 1 MiB is not refused."""
    body = json.dumps(SUM).encode()
    body += b" " * (MAX_BODY - len(body))
    assert len(body) == MAX_BODY
    status, _, data = post(uri, body)
    assert status == 200
    assert rpc_body(data)["result"] == 3


# HTTP/1.1 details ----------------------------------------------------------------------


def _exchange(uri, raw, responses=1):
    """Send raw bytes; return everything received until ``responses`` are complete or
    the server closes."""
    sock = raw_socket(uri)
    try:
        sock.sendall(raw)
        data = b""
        while data.count(b"HTTP/1.1 ") - data.count(b"HTTP/1.1 100") < responses or (
            not data.endswith(b"}")
            and b"Content-Length: 0" not in data
            and not data.endswith(b"\n")
        ):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data
    finally:
        sock.close()


def _request(body, extra=b"", version=b"1.1"):
    return (
        b"POST /rpc HTTP/%s\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (version, len(body), extra, body)
    )


def test_pipelined_requests_are_answered_in_order(uri):
    """Requests sent back to back on one connection get their answers in that order."""
    bodies = [
        json.dumps({"jsonrpc": "2.0", "method": "sum", "params": [n, 1], "id": n}).encode()
        for n in range(5)
    ]
    data = _exchange(uri, b"".join(_request(b) for b in bodies), responses=5)
    results = [
        json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])
        for part in data.split(b"HTTP/1.1 200")[1:]
    ]
    assert [r["id"] for r in results] == [0, 1, 2, 3, 4]
    assert [r["result"] for r in results] == [1, 2, 3, 4, 5]


def test_expect_100_continue(uri):
    """A client that asks before sending its body (as curl does for large ones) is told
    to go on, and then answered."""
    body = json.dumps(SUM).encode()
    sock = raw_socket(uri)
    try:
        head = _request(body, b"Expect: 100-continue\r\n")[: -len(body)]
        sock.sendall(head)
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        data = b""
        while not data.endswith(b"}"):
            data += sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 200 ")
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["result"] == 3
    finally:
        sock.close()


def test_http10_closes_unless_asked_to_keep_alive(uri):
    """An HTTP/1.0 request is answered and the connection closed; with
    ``Connection: keep-alive`` it is kept and says so."""
    body = json.dumps(SUM).encode()
    sock = raw_socket(uri)
    try:
        sock.sendall(_request(body, version=b"1.0"))
        data = read_until_closed(sock)
        assert data.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in data
    finally:
        sock.close()
    data = _exchange(uri, _request(body, b"Connection: keep-alive\r\n", b"1.0") * 2, 2)
    assert data.count(b"HTTP/1.1 200 ") == 2
    assert b"Connection: keep-alive" in data


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"POST /rpc HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"400"),
        (
            b"POST /rpc HTTP/1.1\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            b"400",
        ),
        (b"POST /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"414"),
        (b"POST http://[bad/rpc HTTP/1.1\r\nConnection: close\r\n\r\n", b"400"),
        (b"POST /rpc HTTP/1.1\r\n" + b"X-A: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
    ],
)
def test_malformed_requests_get_a_status_and_a_close(uri, raw, status):
    """A request that is not well-formed HTTP, or whose head is too large, is answered
    with a 4xx status and its connection closed; others are still served."""
    sock = raw_socket(uri)
    try:
        sock.sendall(raw)
        data = read_until_closed(sock)
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 " + status + b" ")
    assert_serving(uri)


def test_upgrade_is_refused(uri):
    """A request asking to switch protocols is refused with 400 and its connection
    closed: we speak only HTTP/1.1, and its body would belong to the other protocol."""
    body = json.dumps(SUM).encode()
    sock = raw_socket(uri)
    try:
        sock.sendall(
            _request(body, b"Connection: Upgrade\r\nUpgrade: h2c\r\n")
            + b"PRI * HTTP/2.0\r\n\r\n"
        )
        data = read_until_closed(sock)
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"upgrade" in data
    assert_serving(uri)


# Connections ---------------------------------------------------------------------------


def test_persistent_connection(spec_server):
    """Several requests on one HTTP/1.1 connection are served on that one connection."""
    conn = connect(spec_server.tcp)
    try:
        peers = []
        for _ in range(4):
            status, headers, data = post(
                conn, {"jsonrpc": "2.0", "method": "peer", "id": 1}
            )
            assert status == 200
            assert headers.get("Connection", "").lower() != "close"
            peers.append(rpc_body(data)["result"])
            sock = conn.sock
            assert sock is not None
        assert conn.sock is sock
        assert len({p["peer"] for p in peers}) == 1
        assert peers[0]["transport"] == "tcp"
        host, port = conn.sock.getsockname()[:2]
        assert peers[0]["peer"] == f"{host}:{port}"
    finally:
        conn.close()


def test_persistent_unix_connection(spec_server):
    """Several requests on one Unix socket connection reuse it."""
    conn = connect(spec_server.unix)
    try:
        post(conn, SUM)
        sock = conn.sock
        for _ in range(3):
            status, _, data = post(conn, {"jsonrpc": "2.0", "method": "peer", "id": 2})
            assert status == 200
            assert rpc_body(data)["result"]["transport"] == "unix"
        assert conn.sock is sock
    finally:
        conn.close()


def test_slow_call_does_not_block_others(spec_server):
    """A call whose result comes later does not hold up another connection."""
    # The result comes 2 s later and the other call must be done within 1.5 s: held
    # up, it would take the 2 s; a 0.5 s delay and a 0.4 s bound left a loaded machine
    # too little for one ordinary call.
    slow = connect(spec_server.tcp)
    try:
        slow.request(
            "POST",
            "/rpc",
            body=json.dumps(
                {"jsonrpc": "2.0", "method": "later", "params": [2.0, "late"], "id": 1}
            ),
        )
        started = time.monotonic()
        assert_serving(spec_server.unix)
        assert time.monotonic() - started < 1.5
        response = slow.getresponse()
        assert rpc_body(response.read()) == {"jsonrpc": "2.0", "result": "late", "id": 1}
        assert time.monotonic() - started >= 1.5
    finally:
        slow.close()


# Errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["boom", "unserialisable"])
def test_internal_errors_do_not_leak(uri, spec_server, method):
    """An unexpected exception or an unserialisable result is -32603 with no details;
    the failure is logged server-side."""
    status, _, data = post(uri, {"jsonrpc": "2.0", "method": method, "id": "x"})
    assert status == 200
    response = rpc_body(data)
    assert response["id"] == "x"
    assert response["error"]["code"] == -32603
    text = data.decode()
    for leak in (
        "Traceback",
        "secret",
        "shadow",
        "RuntimeError",
        "TypeError",
        "spec_server",
        "object",
    ):
        assert leak not in text
    assert "data" not in response["error"]
    if method == "boom":
        spec_server.wait_for_output("method boom failed")
        spec_server.wait_for_output("RuntimeError: secret detail /etc/shadow")
    else:
        spec_server.wait_for_output("result is not JSON-serialisable")
    assert_serving(uri)


def test_internal_error_in_a_batch(uri):
    """In a batch, only the failing request is -32603; the others are answered."""
    status, _, data = post(
        uri,
        [
            {"jsonrpc": "2.0", "method": "unserialisable", "id": 1},
            {"jsonrpc": "2.0", "method": "boom", "id": 2},
            {"jsonrpc": "2.0", "method": "sum", "params": [2, 2], "id": 3},
        ],
    )
    assert status == 200
    by_id = {r["id"]: r for r in rpc_body(data)}
    assert by_id[1]["error"]["code"] == -32603
    assert by_id[2]["error"]["code"] == -32603
    assert by_id[3]["result"] == 4


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","method":"\xff\xfe","id":1}',
        b"\xff\xfe\x00garbage",
        b"\x80",
    ],
)
def test_non_utf8_body_is_parse_error(uri, body):
    """A body that is not UTF-8 is -32700, and the server goes on serving."""
    status, _, data = post(uri, body)
    assert status == 200
    assert rpc_body(data)["error"]["code"] == -32700
    assert rpc_body(data)["id"] is None
    assert_serving(uri)


def test_deeply_nested_body_is_parse_error(uri):
    """A body nested deeper than the JSON parser can go (a megabyte of "[") is -32700,
    not a server error."""
    status, _, data = post(uri, b"[" * MAX_BODY)
    assert status == 200
    assert rpc_body(data)["error"]["code"] == -32700
    assert_serving(uri)


def test_empty_body_is_parse_error(uri):
    """An empty body is -32700."""
    status, _, data = post(uri, b"")
    assert status == 200
    assert rpc_body(data)["error"]["code"] == -32700


def test_wrong_arity_without_schema(uri):
    """Params that do not fit the handler's signature are -32602, not -32603."""
    status, _, data = post(
        uri, {"jsonrpc": "2.0", "method": "subtract", "params": [1], "id": 1}
    )
    assert rpc_body(data)["error"]["code"] == -32602
    status, _, data = post(
        uri,
        {
            "jsonrpc": "2.0",
            "method": "subtract",
            "params": {"minuend": 1, "nope": 2},
            "id": 2,
        },
    )
    assert rpc_body(data)["error"]["code"] == -32602


# In-process servers --------------------------------------------------------------------

SMALL = """
[methods."geo.move"]
summary = "Move a point."
params.point = { type = "Point" }
params.by = { type = "integer", minimum = 1 }

[types.Point]
fields.x = { type = "integer" }
"""


@pytest_twisted.async_yield_fixture
async def serve(short_tmp):
    """Serve RPC resources in-process on real Unix sockets: ``serve(rpc, **site_kwargs)``
    returns the socket URI; all listeners are stopped at the end."""
    started = []
    directory = short_tmp

    def start(rpc, **kwargs):
        path = f"{directory}/s{len(started)}.sock"
        listeners = Listeners(make_factory(rpc, **kwargs), [Listen.unix(path)])
        listeners.startService()
        started.append(listeners)
        return listeners.bound[0]

    yield start
    for listeners in started:
        await listeners.stopService()


def in_thread(f, *args, **kwargs):
    """Run a blocking client call in a thread, bounded by its own socket timeouts."""
    return threads.deferToThread(f, *args, **kwargs)


@pytest_twisted.ensureDeferred
async def test_schema_params_error_names_the_field(serve):
    """Params that do not match the schema are -32602 whose message names the field;
    good params, by name or by position, reach the handler by name."""
    rpc = Dispatcher(schema=parse_schema(SMALL))
    rpc.register("geo.move", lambda point, by: {"x": point["x"] + by})
    uri = serve(rpc)
    cases = [
        ({"point": {"x": "one"}, "by": 1}, "point.x"),
        ({"point": {"x": 1}, "by": 0}, "by"),
        ([{"x": 1}, "two"], "by"),
        ({"point": {"x": 1}}, "by"),
        ({"point": {"x": 1}, "by": 1, "speed": 2}, "speed"),
    ]
    for params, field in cases:
        _, _, data = await in_thread(
            post, uri, {"jsonrpc": "2.0", "method": "geo.move", "params": params, "id": 1}
        )
        error = rpc_body(data)["error"]
        assert error["code"] == -32602, params
        assert field in error["message"], (params, error)
    for params in ({"point": {"x": 1}, "by": 2}, [{"x": 1}, 2]):
        _, _, data = await in_thread(
            post, uri, {"jsonrpc": "2.0", "method": "geo.move", "params": params, "id": 2}
        )
        assert rpc_body(data) == {"jsonrpc": "2.0", "result": {"x": 3}, "id": 2}


@pytest_twisted.ensureDeferred
async def test_discover_lists_every_schema_method(serve):
    """rpc.discover returns the OpenRPC document of the schema, every method listed."""
    schema = load_schema("explorer")
    rpc = Dispatcher(schema=schema, version="9.9")
    uri = serve(rpc)
    _, _, data = await in_thread(
        post, uri, {"jsonrpc": "2.0", "method": "rpc.discover", "id": 1}
    )
    document = rpc_body(data)["result"]
    assert document["openrpc"].startswith("1.")
    assert document["info"]["version"] == "9.9"
    names = [m["name"] for m in document["methods"]]
    assert set(names) == set(schema.methods) | {"rpc.discover"}
    assert all("params" in m and "result" in m for m in document["methods"])
    assert set(document["components"]["schemas"]) == set(schema.types)
    assert "rpc.discover" in rpc.method_names()


def _idle_close_after(uri):
    sock = raw_socket(uri, timeout=5)
    try:
        started = time.monotonic()
        assert read_until_closed(sock) == b""
        return time.monotonic() - started
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_idle_connections_are_closed(serve):
    """A connection that sends nothing is closed after the idle timeout."""
    uri = serve(Dispatcher(), idle_timeout=0.5)
    elapsed = await in_thread(_idle_close_after, uri)
    assert 0.3 <= elapsed < 3


def _idle_after_a_request(uri):
    conn = connect(uri, timeout=5)
    try:
        status, _, data = post(conn, {"jsonrpc": "2.0", "method": "ping", "id": 1})
        assert status == 200
        started = time.monotonic()
        assert conn.sock.recv(1) == b""
        return time.monotonic() - started
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_idle_after_a_request_is_closed(serve):
    """A kept-alive connection left idle after a request is closed after the timeout."""
    rpc = Dispatcher()
    rpc.register("ping", lambda: "pong")
    uri = serve(rpc, idle_timeout=0.5)
    elapsed = await in_thread(_idle_after_a_request, uri)
    assert 0.3 <= elapsed < 3


class _HalfClosingTransport(StringTransport):
    """An in-memory transport that can close its writing side, as TCP and Unix ones can."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


def test_draining_a_refused_body_is_bounded():
    """After a 413 the server discards the rest of the body for LINGER seconds only,
    then drops a client that keeps sending."""
    clock = Clock()
    proto = RpcHTTPFactory(Dispatcher(), clock=clock).buildProtocol(None)
    transport = _HalfClosingTransport()
    proto.makeConnection(transport)
    proto.dataReceived(
        b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (100 * 1024**3)
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.write_closed and not transport.disconnecting
    for _ in range(10):
        proto.dataReceived(b" " * 65536)
        clock.advance(LINGER / 20)
    assert not transport.disconnecting
    clock.advance(LINGER)
    assert transport.disconnected  # aborted, not closed gracefully
    proto.connectionLost()
    assert not clock.getDelayedCalls()


def _send_and_hang_up(uri, started):
    sock = raw_socket(uri)
    body = json.dumps({"jsonrpc": "2.0", "method": "forever", "id": 1}).encode()
    sock.sendall(
        b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    wait_for(lambda: started, timeout=5, interval=0.01, what="the call to start")
    sock.close()


@pytest_twisted.ensureDeferred
async def test_call_cancelled_when_client_hangs_up(serve):
    """A caller that disconnects mid-call cancels the handler's Deferred, quietly."""
    cancelled = []
    started = []

    def forever():
        started.append(True)
        return defer.Deferred(lambda d: cancelled.append(True))

    rpc = Dispatcher()
    rpc.register("forever", forever)
    uri = serve(rpc)
    await in_thread(_send_and_hang_up, uri, started)
    await in_thread(wait_for, lambda: cancelled, timeout=5, what="cancellation")
    assert started


def _memory_protocol(rpc):
    """An RpcHTTPProtocol on an in-memory transport."""
    proto = RpcHTTPFactory(rpc, clock=Clock()).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_refusal_waits_for_earlier_answers():
    """A request refused while an earlier pipelined call still runs is refused only
    once that call is answered: answers stay in request order, and nothing is cancelled."""
    pending = []

    def wait():
        pending.append(defer.Deferred())
        return pending[-1]

    rpc = Dispatcher()
    rpc.register("wait", wait)
    proto, transport = _memory_protocol(rpc)
    proto.dataReceived(
        _request(json.dumps({"jsonrpc": "2.0", "method": "wait", "id": 1}).encode())
    )
    proto.dataReceived(b"POST /rpc HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
    proto.dataReceived(b"x" * 65536)
    assert transport.value() == b""
    pending[0].callback("done")
    data = transport.value()
    assert data.startswith(b"HTTP/1.1 200 ")
    first, rest = data.split(b'"done"', 1)
    assert b"HTTP/1.1 413 " in rest and data.count(b"HTTP/1.1 ") == 2
    assert transport.disconnecting


def test_garbage_after_a_good_request_is_refused_after_its_answer():
    """A good request followed by garbage in one packet gets its answer, then the 400."""
    rpc = Dispatcher()
    rpc.register("echo", lambda value=None: value)
    proto, transport = _memory_protocol(rpc)
    body = json.dumps({"jsonrpc": "2.0", "method": "echo", "params": [5], "id": 1}).encode()
    proto.dataReceived(_request(body) + b"GARBAGE\r\n\r\n")
    data = transport.value()
    assert data.startswith(b"HTTP/1.1 200 ")
    assert data.index(b'"result":5') < data.index(b"HTTP/1.1 400 ")


def test_many_pipelined_immediate_answers(logged_errors):
    """Thousands of pipelined calls whose Deferreds have already fired are answered in
    order, without recursing once per request."""
    rpc = Dispatcher()
    rpc.register("now", lambda n: defer.succeed(n))
    proto, transport = _memory_protocol(rpc)
    count = 3000
    proto.dataReceived(
        b"".join(
            _request(
                json.dumps(
                    {"jsonrpc": "2.0", "method": "now", "params": [n], "id": n}
                ).encode()
            )
            for n in range(count)
        )
    )
    answers = [
        json.loads(part.split(b"\r\n\r\n", 1)[1])
        for part in transport.value().split(b"HTTP/1.1 200 OK")[1:]
    ]
    assert [a["result"] for a in answers] == list(range(count))


def test_clear_stale_socket(tmp_path, logged_errors):
    """A socket nothing listens on is removed with its lock; a live socket and a file
    that is not a socket are left alone."""
    from hero_compute.rpc.listeners import clear_stale_socket

    stale, live, plain = (str(tmp_path / n) for n in ("stale.sock", "live.sock", "plain"))
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()
    os.symlink("1", stale + ".lock")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(live)
    listening.listen()
    open(plain, "w").close()
    try:
        for path in (stale, live, plain, str(tmp_path / "missing")):
            clear_stale_socket(path)
        assert not os.path.lexists(stale) and not os.path.lexists(stale + ".lock")
        assert os.path.exists(live) and os.path.exists(plain)
    finally:
        listening.close()


def test_closed_connections_are_freed_without_the_cycle_collector():
    """A connection's protocol is freed as soon as it is closed and dropped, with no
    reference cycle left for the cycle collector (whose full passes are the explorer's
    longest pauses at fleet scale)."""
    import gc
    import weakref

    rpc = Dispatcher()
    rpc.register("echo", lambda value=None: value)
    factory = RpcHTTPFactory(rpc, clock=Clock())
    gc.disable()
    try:
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(_request(json.dumps(SUM).encode()))
        assert b"HTTP/1.1 200 " in transport.value()
        proto.connectionLost()
        ref = weakref.ref(proto)
        transport.protocol = None
        del proto, transport
        assert ref() is None
    finally:
        gc.enable()


def _self_signed_pem(path):
    """Write a throwaway key and self-signed certificate for 127.0.0.1 to ``path``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def _tls_exchange(port, raw):
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
        with context.wrap_socket(plain) as sock:
            sock.sendall(raw)
            data = b""
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except (ssl.SSLError, OSError):
                pass
            return data


@pytest_twisted.ensureDeferred
async def test_oversized_body_over_tls_is_413(tmp_path):
    """Over TLS too, a declared oversized body gets its 413 (TLS cannot half-close, so
    the connection lingers and then closes), and the listener goes on serving."""
    pem = str(tmp_path / "server.pem")
    _self_signed_pem(pem)
    rpc = Dispatcher()
    rpc.register("echo", lambda value=None: value)
    listeners = Listeners(
        make_factory(rpc), [f"ssl:0:interface=127.0.0.1:privateKey={pem}"]
    )
    listeners.startService()
    try:
        port = int(listeners.bound[0].rsplit(":", 1)[1])
        assert listeners.bound[0].startswith("tls://")
        data = await in_thread(
            _tls_exchange,
            port,
            b"POST /rpc HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (MAX_BODY + 1, b"x" * 65536),
        )
        assert data.startswith(b"HTTP/1.1 413 ")
        body = json.dumps(
            {"jsonrpc": "2.0", "method": "echo", "params": [7], "id": 1}
        ).encode()
        data = await in_thread(
            _tls_exchange, port, _request(body, b"Connection: close\r\n")
        )
        assert data.startswith(b"HTTP/1.1 200 ") and b'"result":7' in data
    finally:
        await listeners.stopService()


def test_idle_sweep_is_one_timer_for_all_connections():
    """However many connections, one timer sweeps the idle ones: a connection is cut
    off within a quarter of the idle timeout after it, one with a call in flight is not,
    and the timer goes when the last connection does."""
    clock = Clock()
    rpc = Dispatcher()
    pending = defer.Deferred()
    rpc.register("wait", lambda: pending)
    factory = RpcHTTPFactory(rpc, idle_timeout=8.0, clock=clock)
    conns = []
    for _ in range(50):
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        conns.append((proto, transport))
    assert len(clock.getDelayedCalls()) == 1
    busy, busy_transport = conns[0]
    body = b'{"jsonrpc":"2.0","method":"wait","id":1}'
    busy.dataReceived(
        b"POST /rpc HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    clock.advance(6)
    talker, talker_transport = conns[1]
    talker.dataReceived(b"P")  # a byte resets its idle time
    clock.pump([1] * 4)  # 10 s: past the timeout for the silent ones, not for the talker
    aborted = [t for _, t in conns if t.disconnecting]
    assert len(aborted) == 48
    assert not busy_transport.disconnecting and not talker_transport.disconnecting
    for proto, _ in conns:
        proto.connectionLost(None)
    assert clock.getDelayedCalls() == []


def _pipeline_without_reading(uri, count, looked):
    """Pipeline ``count`` requests on one connection that never reads; keep it open
    until ``looked`` is set (or 10 s), then hang up."""
    sock = raw_socket(uri, timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = b'{"jsonrpc":"2.0","method":"big","id":1}'
    one = b"POST /rpc HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    try:
        sock.sendall(one * count)
    except TimeoutError:
        pass
    looked.wait(10)
    sock.close()


@pytest_twisted.ensureDeferred
async def test_unsent_limit_is_ours_not_the_read_size(short_tmp):
    """Reading stops once HERO_MAX_UNSENT bytes of answers wait unsent, not at the
    transport's small buffer size (which is also its read size)."""
    from hero_compute.rpc.http_server import READ_SIZE
    from hero_compute.rpc.limits import Limits

    rpc = Dispatcher()
    rpc.register("big", lambda: "x" * 20_000)
    limit = 8 * READ_SIZE
    factory = make_factory(rpc, limits=Limits(max_unsent=limit))
    listeners = Listeners(factory, [Listen.unix(f"{short_tmp}/u.sock")])
    listeners.startService()
    try:
        seen = []

        def look():
            for proto in factory._connections:
                t = proto.transport
                unsent = len(t.dataBuffer) + t._tempDataLen
                seen.append((proto._reading_paused, unsent, t.bufferSize))

        looked = threading.Event()
        sending = in_thread(_pipeline_without_reading, listeners.bound[0], 400, looked)
        try:
            # Sampled once the server has stopped reading (the thread holds the
            # connection open until then), not at a guessed moment.
            await until(
                lambda: any(p._reading_paused for p in factory._connections),
                what="the server to stop reading",
            )
            look()
        finally:
            looked.set()
            await sending
    finally:
        await listeners.stopService()
    ((paused, unsent, read_size),) = seen
    assert paused, "never stopped reading"
    assert read_size == READ_SIZE
    # Past the read size by far, within the limit plus one answer and the kernel's
    # share.
    assert 4 * READ_SIZE < unsent <= limit + 25_000, unsent
