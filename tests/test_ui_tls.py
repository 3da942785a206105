"""
The dashboard over mutual TLS: a ``client/*`` certificate stands in for the token; no
certificate, or another role's, still gets 401.
"""

import base64
import http.client
import json
import os
import re
import socket
import ssl

import pytest

from hero_compute import pki


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A fleet CA and explorer, client and node certificates for 127.0.0.1."""
    base = tmp_path_factory.mktemp("uipki")
    pki.create_ca(str(base / "ca"))
    out = {"ca": str(base / "ca" / "ca.pem")}
    for role, name in (("explorer", "e1"), ("client", "ops"), ("node", "n1")):
        out[role] = pki.create_cert(
            str(base / "ca"),
            role,
            name,
            ips=["127.0.0.1"],
            out=str(base / f"{role}-{name}"),
        )
    return out


@pytest.fixture
def explorer(twistd, short_tmp, certs):
    """An explorer whose dashboard listens on TLS (EXPLORER_UI_TLS)."""
    cert, key = certs["explorer"]
    process = twistd(
        ["explorer"],
        env={
            "HERO_SOCKET_DIR": short_tmp,
            "EXPLORER_STATE_DIR": f"{short_tmp}/state",
            "EXPLORER_TLS_CERT": cert,
            "EXPLORER_TLS_KEY": key,
            "EXPLORER_TLS_CA": certs["ca"],
            "EXPLORER_UI_ADDR": "127.0.0.1:0",
            "EXPLORER_UI_TLS": "1",
        },
    )
    line = process.wait_for_line(
        r"dashboard: https://127\.0\.0\.1:(\d+)/ with the token in (\S+)\)"
    )[0]
    process.port = int(line.group(1))
    with open(line.group(2)) as f:
        process.token = f.read().strip()
    return process


def get(explorer, certs, who, path="/", method="GET", body=None, csrf=None):
    """One request to the dashboard over TLS as ``who`` (None: no certificate), as the
    page's script makes it (its Origin, and ``csrf`` in ``X-CSRF-Token`` if given)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(certs["ca"])
    if who is not None:
        context.load_cert_chain(*certs[who])
    conn = http.client.HTTPSConnection(
        "127.0.0.1", explorer.port, context=context, timeout=10
    )
    try:
        headers = {"Origin": f"https://127.0.0.1:{explorer.port}"}
        if body:
            headers["Content-Type"] = "application/json"
        if csrf is not None:
            headers["X-CSRF-Token"] = csrf
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_client_certificate_stands_in_for_the_token(explorer, certs):
    """A client/* certificate opens the page as an operator, and its RPC with the page's
    CSRF token (403 without); removing a node is still not the dashboard's to do."""
    status, page = get(explorer, certs, "client")
    assert status == 200 and b"<html" in page.lower()
    assert b'<meta name="ui-role" content="operator">' in page
    csrf = re.search(rb'<meta name="csrf-token" content="([^"]+)">', page)[1].decode()
    info = json.dumps({"jsonrpc": "2.0", "method": "explorer.info", "id": 1})
    assert get(explorer, certs, "client", "/rpc", "POST", info)[0] == 403
    status, body = get(explorer, certs, "client", "/rpc", "POST", info, csrf)
    assert status == 200 and "result" in json.loads(body)
    status, body = get(
        explorer,
        certs,
        "client",
        "/rpc",
        "POST",
        json.dumps(
            {
                "jsonrpc": "2.0",
                "method": "explorer.remove_node",
                "params": {"node_id": "x"},
                "id": 2,
            }
        ),
        csrf,
    )
    assert json.loads(body)["error"]["code"] == -32010


@pytest.mark.parametrize("who", [None, "node", "explorer"])
def test_other_peers_still_need_the_token(explorer, certs, who):
    """No certificate, or a node's or explorer's, is not a client: 401 without a token."""
    assert get(explorer, certs, who)[0] == 401
    rpc = json.dumps({"jsonrpc": "2.0", "method": "explorer.info", "id": 1})
    assert get(explorer, certs, who, "/rpc", "POST", rpc)[0] == 401


def test_token_still_works_over_tls(explorer, certs):
    """Without a certificate, the logged token still trades for a session."""
    status, _ = get(explorer, certs, None, f"/?token={explorer.token}")
    assert status == 302


def test_console_over_tls_for_a_client_certificate(explorer, certs):
    """Over the TLS dashboard a client/* certificate (an operator) reaches the
    explorer's console relay through the taken-over TLS connection (an unknown node:
    the relay's 404) with the page's key in Sec-WebSocket-Protocol (403 without), and
    a node certificate gets 401, nothing relayed."""
    key = base64.b64encode(os.urandom(16)).decode()
    page = get(explorer, certs, "client")[1]
    csrf = re.search(rb'<meta name="csrf-token" content="([^"]+)">', page)[1].decode()

    def upgrade(who, path, protocol=f"hero-ui, k.{csrf}"):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(certs["ca"])
        context.load_cert_chain(*certs[who])
        raw = socket.create_connection(("127.0.0.1", explorer.port), timeout=10)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(
                (
                    f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{explorer.port}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                    f"Origin: https://127.0.0.1:{explorer.port}\r\n"
                    + (f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else "")
                    + "\r\n"
                ).encode()
            )
            got = b""
            try:
                while chunk := s.recv(65536):
                    got += chunk
                    if b"\r\n\r\n" in got:
                        # The answer's head is in: a second answer would follow at once
                        # (the dashboard keeps a refused connection open, not waited out).
                        s.settimeout(1)
            except (TimeoutError, ssl.SSLError):
                pass
            return got

    answer = upgrade("client", "/v1/nodes/ghost/vms/x/console", protocol=None)
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    answer = upgrade("client", "/v1/nodes/ghost/vms/x/console")
    assert answer.startswith(b"HTTP/1.1 404 "), answer
    # The relay's status alone (the dashboard's own refusals carry a text body).
    assert answer.count(b"HTTP/1.1") == 1 and b"Content-Length: 0" in answer, answer
    answer = upgrade("node", "/v1/nodes/ghost/vms/x/console")
    assert answer.startswith(b"HTTP/1.1 401 "), answer
