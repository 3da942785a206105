"""
The console through the dashboard (CONTRACT §11): who may open it (operators, same
origin), and that the browser's connection is only ever joined to the explorer's console
relay, never to the rest of the Unix socket it reaches it by.
"""

import base64
import json
import os
import socket
import urllib.parse

from .support import result
from .test_ui import login, start_explorer
from .test_ui_operator import make_login

NODE = "n1"


def raw(url, head, extra=b"", timeout=10):
    """Send ``head`` (and ``extra`` in the same write) to the dashboard; all it answers
    until it closes the connection (or ``timeout``)."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(head + extra)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except TimeoutError:
            got += b"<timeout>"
        return got


def upgrade(url, cookie, path=f"/v1/nodes/{NODE}/vms/vm1/console", origin=None, **more):
    """A browser's WebSocket upgrade request for ``path`` (bytes)."""
    parts = urllib.parse.urlsplit(url)
    headers = {
        "Host": parts.netloc,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        "Origin": origin or f"http://{parts.netloc}",
        "Cookie": cookie,
        **more,
    }
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items() if v]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status(answer):
    """The HTTP status of an answer's first line."""
    return int(answer.split(b" ", 2)[1])


def test_console_refusals(twistd, short_tmp):
    """No session 401, a viewer 403, another origin or none 403, a POST 405, another
    path 404, no upgrade 400: each answered by the dashboard, nothing relayed."""
    _, unix, _, startup = start_explorer(twistd, short_tmp)

    def raw(url, head):
        # The dashboard keeps a refused connection open for the next request: close it.
        return globals()["raw"](
            url, head.replace(b"Connection: Upgrade", b"Connection: Upgrade, close")
        )

    viewer = login(startup)
    operator = login(make_login(unix, "olga", "operator"))
    assert status(raw(startup, upgrade(startup, None))) == 401
    assert status(raw(startup, upgrade(startup, viewer))) == 403
    for origin in ("http://evil.example", "null"):
        assert status(raw(startup, upgrade(startup, operator, origin=origin))) == 403
    answer = raw(startup, upgrade(startup, operator, Origin=None))
    assert status(answer) == 403, answer
    post = upgrade(startup, operator).replace(b"GET ", b"POST ", 1)
    assert status(raw(startup, post)) == 405
    other = upgrade(startup, operator, path="/v1/nodes/n1/vms/vm1/consolex")
    assert status(raw(startup, other)) == 404
    plain = upgrade(startup, operator, Upgrade=None)
    assert status(raw(startup, plain)) == 400


def test_refused_upgrade_joins_nothing(twistd, short_tmp):
    """
    An operator's upgrade the explorer does not take (no such node, or no relay) is
    answered with its status alone and the connection closed: a request sent behind it
    on the same connection never reaches the explorer's Unix socket.
    """
    _, unix, _, startup = start_explorer(twistd, short_tmp)
    result(unix, "explorer.heartbeat",
           {"node_id": NODE, "socket_path": f"unix://{short_tmp}/nobody.sock"})  # fmt: skip
    operator = login(make_login(unix, "olga", "operator"))
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "explorer.remove_node",
                       "params": {"node_id": NODE}}).encode()  # fmt: skip
    smuggled = (
        b"POST /rpc HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answer = raw(startup, upgrade(startup, operator, path="/v1/nodes/ghost/vms/x/console"),
                 smuggled)  # fmt: skip
    assert status(answer) in (400, 404, 502), answer
    assert answer.count(b"HTTP/1.1") == 1 and b"jsonrpc" not in answer, answer
    assert [n["node_id"] for n in result(unix, "explorer.list_nodes")] == [NODE]
    answer = raw(startup, upgrade(startup, operator), smuggled)
    assert status(answer) in (400, 404, 502), answer
    assert answer.count(b"HTTP/1.1") == 1 and b"jsonrpc" not in answer, answer
    assert [n["node_id"] for n in result(unix, "explorer.list_nodes")] == [NODE]
