"""
The dashboard against a browser turned on it (issue 17, item 4, CONTRACT §11), from the
attacker's side, against a real ``twistd explorer``: the session cookie is ``Secure`` on
a TLS listener (and only there), ``POST /rpc`` is refused without a same-origin
``Origin``, a ``Host`` that is not one of the dashboard's is 421 (DNS rebinding), and
the login token never reaches the log.
"""

import http.client
import json
import os
import ssl
import stat

import pytest

from hero_compute import pki
from hero_compute.explorer.dashboard_guard import HostGuard

from .support import result, rpc
from .test_ui import KEYS

HEARTBEAT = {
    "node_id": "n1",
    "socket_path": "unix:///nonexistent/n1.sock",
    "name": "n1",
    "capacity": {"vcpus": 4, "memory_mb": 4096, "disk_gb": 40},
    "usage": {"vcpus": 0, "memory_mb": 0, "disk_gb": 0},
    "vm_count": 0,
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A fleet CA and an explorer certificate for 127.0.0.1."""
    base = tmp_path_factory.mktemp("uiguard")
    pki.create_ca(str(base / "ca"))
    cert, key = pki.create_cert(
        str(base / "ca"), "explorer", "e1", ips=["127.0.0.1"], out=str(base / "e1")
    )
    return {"ca": str(base / "ca" / "ca.pem"), "cert": cert, "key": key}


@pytest.fixture
def dashboard(twistd, short_tmp, certs):
    """
    ``dashboard(tls=False, **variables)``: a real explorer with its dashboard on
    127.0.0.1; ``.port``, ``.token``, ``.token_file``, ``.unix`` and ``.tls`` are set.
    """
    count = []

    def start(tls=False, **variables):
        n = len(count)
        count.append(n)
        sock = f"{short_tmp}/e{n}.sock"
        env = {
            "EXPLORER_STATE_DIR": f"{short_tmp}/state{n}",
            "EXPLORER_UI_ADDR": "127.0.0.1:0",
            **{k: str(v) for k, v in variables.items()},
        }
        if tls:
            env.update(
                EXPLORER_UI_TLS="1",
                EXPLORER_TLS_CERT=certs["cert"],
                EXPLORER_TLS_KEY=certs["key"],
                EXPLORER_TLS_CA=certs["ca"],
            )
        process = twistd(["explorer", "--socket", sock], env=env)
        (line,) = process.wait_for_line(
            r"dashboard: https?://127\.0\.0\.1:(\d+)/ with the token in (\S+)\)"
        )
        process.port, process.token_file = int(line.group(1)), line.group(2)
        with open(process.token_file) as f:
            process.token = f.read().strip()
        process.unix, process.tls = f"unix://{sock}", tls
        process.listening(count=2)
        result(process.unix, "explorer.heartbeat", HEARTBEAT)
        return process

    return start


def request(process, method="GET", path="/", headers=None, body=None):
    """
    One request to the dashboard (over TLS when it is), with exactly these headers
    (``Host`` included: http.client adds none of its own here).

    :return: ``(status, headers as a lower-cased dict, body)``
    """
    if process.tls:
        context = ssl.create_default_context(cafile=None)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(
            "127.0.0.1", process.port, context=context, timeout=10
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", process.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def own_host(process):
    """The ``Host`` a browser sends for the dashboard's own URL."""
    return f"127.0.0.1:{process.port}"


def own_origin(process):
    """The dashboard's own origin, as a browser sends it in ``Origin``."""
    return f"{'https' if process.tls else 'http'}://{own_host(process)}"


def login(process, host=None):
    """:return: ``(status, Set-Cookie or None)`` of the token exchange"""
    status, headers, _ = request(
        process,
        path=f"/?token={process.token}",
        headers={"Host": host or own_host(process)},
    )
    cookie = headers.get("set-cookie")
    if cookie is not None:
        KEYS[cookie.split(";", 1)[0]] = headers["location"][len("/#k=") :]
    return status, cookie


def csrf(process, cookie):
    """The session's CSRF token, as its login redirect's fragment handed it to the
    page (the page got with the cookie never carries it)."""
    _, _, page = request(process, headers={"Host": own_host(process), "Cookie": cookie})
    assert b'<meta name="csrf-token" content="">' in page
    return KEYS[cookie]


def call(process, cookie, method="explorer.list_nodes", params=None, **headers):
    """``POST /rpc`` with a session, its CSRF token and the given headers (``Host``
    defaults to ours)."""
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
    ).encode()
    sent = {
        "Host": own_host(process),
        "Content-Type": "application/json",
        "Cookie": cookie,
        "X-CSRF-Token": csrf(process, cookie),
        **headers,
    }
    return request(process, "POST", "/rpc", {k: v for k, v in sent.items() if v}, body)


def fleet(process):
    """What the explorer holds, read over its Unix socket."""
    return sorted(n["node_id"] for n in result(process.unix, "explorer.list_nodes"))


@pytest.mark.parametrize("tls", [False, True])
def test_session_cookie_is_secure_on_tls_only(dashboard, tls):
    """
    The session cookie is HttpOnly and SameSite=Strict on both listeners, and Secure on
    the TLS one (so a browser never sends it over plain http:// to the same host).
    """
    process = dashboard(tls=tls)
    status, cookie = login(process)
    assert status == 302 and cookie is not None
    flags = [f.strip().lower() for f in cookie.split(";")[1:]]
    assert "httponly" in flags and "samesite=strict" in flags, cookie
    assert ("secure" in flags) == tls, cookie


@pytest.mark.parametrize("tls", [False, True])
def test_cross_origin_and_origin_less_posts_are_refused(dashboard, tls):
    """
    With a valid session, ``POST /rpc`` from another origin (another site, the same
    host over the other scheme or port, ``null``) or without ``Origin`` is 403 and is
    not dispatched (no JSON-RPC answer); from the dashboard's own origin it is served.
    The fleet is unchanged.
    """
    process = dashboard(tls=tls)
    cookie = login(process)[1].split(";", 1)[0]
    before = fleet(process)
    other_scheme = "http" if tls else "https"
    for origin in (
        "http://evil.example",
        f"{other_scheme}://{own_host(process)}",
        f"{'https' if tls else 'http'}://127.0.0.1:{process.port + 1}",
        "null",
        None,
    ):
        status, _, body = call(
            process, cookie, "explorer.remove_node", {"node_id": "n1"}, Origin=origin
        )
        assert status == 403, (origin, status, body)
        assert b"jsonrpc" not in body
    assert fleet(process) == before == ["n1"]
    status, _, body = call(process, cookie, Origin=own_origin(process))
    assert status == 200 and [n["node_id"] for n in json.loads(body)["result"]] == ["n1"]


@pytest.mark.parametrize("tls", [False, True])
def test_foreign_host_is_421(dashboard, tls):
    """
    A request whose ``Host`` is not one of the dashboard's (a rebound DNS name, or none)
    is 421 on every path: no session is minted from the token, no call is made, and the
    fleet is unchanged.
    """
    process = dashboard(tls=tls)
    cookie = login(process)[1].split(";", 1)[0]
    before = fleet(process)
    for host in ("evil.example", f"evil.example:{process.port}", "127.0.0.1.nip.io"):
        status, cookie_set = login(process, host=host)
        assert status == 421 and cookie_set is None, (host, status)
        for path in ("/", "/static/app.js"):
            status, _, _ = request(
                process, path=path, headers={"Host": host, "Cookie": cookie}
            )
            assert status == 421, (host, path, status)
        status, _, body = call(
            process,
            cookie,
            "explorer.remove_node",
            {"node_id": "n1"},
            Host=host,
            Origin=f"{'https' if process.tls else 'http'}://{host}",
        )
        assert status == 421 and b"jsonrpc" not in body, (host, status)
    status, _, _ = request(process, path="/", headers={"Cookie": cookie})  # no Host
    assert status == 421
    assert fleet(process) == before == ["n1"]


def test_ui_hosts_names_the_hosts_answered_for(dashboard):
    """
    With EXPLORER_UI_HOSTS=ui.example, that name is answered for and localhost is not
    any more; an IP literal of the listener still is.
    """
    process = dashboard(EXPLORER_UI_HOSTS="ui.example")
    assert login(process, host=f"ui.example:{process.port}")[0] == 302
    assert login(process, host=f"UI.Example:{process.port}")[0] == 302
    assert login(process, host=f"localhost:{process.port}")[0] == 421
    assert login(process, host=own_host(process))[0] == 302


def test_host_guard_defaults_and_literals():
    """By default localhost, 127.0.0.1 and [::1] are answered for, IPv6 Hosts in
    brackets; an IP literal is allowed only if it is the listener's own address."""

    class Request:
        def __init__(self, host, local):
            self._host, self._local = host, local

        def getHeader(self, name):
            return self._host

        def getHost(self):
            return type("A", (), {"host": self._local})()

    guard = HostGuard()
    for host in (b"localhost", b"localhost:8080", b"127.0.0.1:1", b"[::1]:9"):
        assert guard.allows(Request(host, "10.0.0.1")), host
    assert guard.allows(Request(b"10.0.0.1:80", "10.0.0.1"))
    assert guard.allows(Request(b"[fe80::1]:80", "fe80::1"))
    for host in (b"10.0.0.2:80", b"evil.example", b"", b"[", b"local host"):
        assert not guard.allows(Request(host, "10.0.0.1")), host
    assert not guard.allows(Request(None, "10.0.0.1"))


def test_login_token_is_kept_in_a_private_file_not_in_the_log(dashboard):
    """
    The random login token is written to STATE_DIR/ui-token, mode 0600, and the log
    names that file but never holds the token (twistd's log file is world-readable).
    """
    process = dashboard()
    assert process.token_file.endswith("/ui-token")
    mode = stat.S_IMODE(os.stat(process.token_file).st_mode)
    assert mode == 0o600, oct(mode)
    assert len(process.token) >= 32
    assert process.token not in process.output
    assert login(process)[0] == 302
    assert "result" in rpc(process.unix, "explorer.info")


def test_ui_hosts_option():
    """--ui-hosts and EXPLORER_UI_HOSTS give the names, the command line first; unset,
    the --ui host and the defaults."""
    from hero_compute.explorer.tap import Options

    def parse(args, env):
        options = Options(env={"HOME": "/nonexistent", **env})
        options.parseOptions(["--ui", "10.1.2.3:9200", *args])
        return options["ui-hosts"]

    assert parse([], {}) == ["10.1.2.3", "localhost", "127.0.0.1", "[::1]"]
    assert parse([], {"EXPLORER_UI_HOSTS": "a.example, b.example"}) == [
        "a.example",
        "b.example",
    ]
    assert parse(["--ui-hosts", "c.example"], {"EXPLORER_UI_HOSTS": "a.example"}) == [
        "c.example"
    ]
