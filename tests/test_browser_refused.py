"""
A web page against the JSON-RPC listeners, from the attacker's side: a real ``twistd``
explorer and node (Unix, loopback TCP and mutual TLS) and a real QEMU guest under TCG.
The requests are the ones a browser sends for any site: a "simple" cross-site ``POST``
(``Content-Type: text/plain``, no preflight) and a WebSocket handshake, both carrying
``Origin``; the same after a DNS rebinding (``Host`` of the attacker's name); and the
fetch metadata (``Sec-Fetch-Site``) alone.  Every one is 403 with nothing dispatched, and
what it aimed at is unchanged; our own clients, which send neither, are served.  The
dashboard, for browsers, has guards of its own (``test_ui*``).
"""

import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from hero_compute.rpc.addresses import parse_address
from hero_compute.rpc.dispatch import Dispatcher
from hero_compute.rpc.http_server import RpcHTTPFactory
from hero_compute.rpc.http_wire import BROWSER_REFUSED

from .support import (
    ROOT,
    Twistd,
    connect,
    make_short_tmp,
    post,
    remove_tmp,
    result,
    tls_connect,
)
from .test_metrics import scrape
from .test_ui import browser  # noqa: F401
from .wsclient import WsClient

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="qemu-system-x86_64 is not installed",
    ),
]

EVIL = "http://evil.example"
NODE = "a"


def _metrics_uri(process):
    (match,) = process.wait_for_line(r"listening on (\S+) \(Prometheus metrics")
    return match.group(1)


def _rpc_uris(process, count):
    """The JSON-RPC listeners' URIs (not the metrics one), by scheme."""
    lines = process.wait_for_line(r"listening on (\S+)(?! \(Prometheus)$", count=count)
    return {uri.split(":", 1)[0]: uri for uri in (m.group(1) for m in lines)}


class Site:
    """The explorer, the node, their listeners and the running VM under attack."""

    def __init__(self, fleet, tmp):
        self.fleet = fleet
        self.tmp = tmp
        cert, key = fleet["explorer/e1"]
        self.explorer = Twistd(
            ["explorer"],
            env={
                "HERO_SOCKET_DIR": tmp,
                "EXPLORER_STATE_DIR": f"{tmp}/state",
                "EXPLORER_TCP_ADDR": "127.0.0.1:0",
                "EXPLORER_TLS_ADDR": "127.0.0.1:0",
                "EXPLORER_TLS_CERT": cert,
                "EXPLORER_TLS_KEY": key,
                "EXPLORER_TLS_CA": fleet["ca"],
                "EXPLORER_METRICS_ADDR": "127.0.0.1:0",
            },
        )
        self.ex = _rpc_uris(self.explorer, 3)
        self.ex_metrics = _metrics_uri(self.explorer)
        ncert, nkey = fleet[f"node/{NODE}"]
        self.node_state = f"{tmp}/n"
        self.node = Twistd(
            ["node", "--socket", f"{tmp}/n.sock"],
            env={
                "HERO_STATE_DIR": self.node_state,
                "EXPLORER_ADDRESSES": self.ex["unix"],
                "NODE_ID": NODE,
                "NODE_ACCEL": "tcg",
                "NODE_TCP_ADDR": "127.0.0.1:0",
                "NODE_TLS_ADDR": "127.0.0.1:0",
                "NODE_TLS_CERT": ncert,
                "NODE_TLS_KEY": nkey,
                "NODE_TLS_CA": fleet["ca"],
                "NODE_METRICS_ADDR": "127.0.0.1:0",
                "HEARTBEAT_INTERVAL": "0.5",
            },
        )
        self.no = _rpc_uris(self.node, 3)
        self.node_metrics = _metrics_uri(self.node)
        vm = result(self.no["unix"], "vm.create", _VM, timeout=60)
        self.vm_id = vm["vm_id"]
        result(self.no["unix"], "vm.start", {"vm_id": self.vm_id}, timeout=90)

    def uri(self, who, scheme):
        """A listener's URI: ``who`` is ``explorer`` or ``node``."""
        return (self.ex if who == "explorer" else self.no)[scheme]

    def console(self, who):
        """The VM's console path on the explorer or on the node."""
        if who == "explorer":
            return f"/v1/nodes/{NODE}/vms/{self.vm_id}/console"
        return f"/v1/vms/{self.vm_id}/console"

    def context(self):
        """A TLS client context with the fleet's ``client/ops`` certificate (a browser
        may hold one too, and sends it cross-site)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(self.fleet["ca"])
        ctx.load_cert_chain(*self.fleet["client/ops"])
        return ctx

    def vm_state(self):
        """The VM's state, asked over the node's Unix socket."""
        return result(self.no["unix"], "vm.get", {"vm_id": self.vm_id})["state"]

    def vm_names(self):
        """The names of the node's VMs."""
        return sorted(vm["name"] for vm in result(self.no["unix"], "vm.list"))

    def node_ids(self):
        """The ids of the nodes the explorer knows."""
        return sorted(n["node_id"] for n in result(self.ex["unix"], "explorer.list_nodes"))

    def close(self):
        """Kill the VM's QEMU, stop both processes."""
        try:
            pid = int(open(f"{self.node_state}/vms/{self.vm_id}/qemu.pid").read())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, AttributeError):
            pass
        self.node.stop()
        self.explorer.stop()


#: The VM under attack: no image, so QEMU runs (its firmware finds nothing to boot)
#: without a guest's boot to wait for.
_VM = {"name": "victim", "vcpus": 1, "memory_mb": 64, "disk_gb": 1, "network": "none"}


@pytest.fixture(scope="module")
def site(fleet_pki):
    """The module's explorer and node, and their VM, running."""
    tmp = make_short_tmp("hcb-")
    made = None
    try:
        made = Site(fleet_pki, tmp)
        yield made
    finally:
        if made is not None:
            made.close()
        remove_tmp(tmp)


def exchange(site, uri, data, timeout=10.0):
    """
    Send raw bytes to a listener (TLS with ``client/ops`` for ``tls://``) and read one
    answer's head and body.

    :return: ``(status, head bytes, body bytes)``
    """
    address = parse_address(uri)
    if address.is_unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address.path)
    else:
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
        if uri.startswith("tls://"):
            sock = site.context().wrap_socket(sock)
    try:
        sock.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    finally:
        sock.close()
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, head, body


def browser_post(method, params, headers, host="localhost"):
    """A ``POST /rpc`` as a web page's script or form sends it: ``headers`` added."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    lines = [
        b"POST /rpc HTTP/1.1",
        b"Host: " + host.encode(),
        b"Content-Length: %d" % len(body),
        *(h.encode() for h in headers),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body.encode()


def browser_upgrade(path, headers, host="localhost"):
    """A WebSocket handshake as a browser sends it: ``headers`` added."""
    lines = [
        b"GET " + path.encode() + b" HTTP/1.1",
        b"Host: " + host.encode(),
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
        *(h.encode() for h in headers),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def stop_vm(site, who):
    """The call that stops the VM, on the explorer (``explorer.call``) or the node."""
    stop = {"vm_id": site.vm_id, "force": True}
    if who == "explorer":
        return "explorer.call", {"node_id": NODE, "method": "vm.stop", "params": stop}
    return "vm.stop", stop


LISTENERS = [
    ("explorer", "tcp"),
    ("explorer", "tls"),
    ("explorer", "unix"),
    ("node", "tcp"),
    ("node", "tls"),
    ("node", "unix"),
]


@pytest.mark.parametrize("who,scheme", LISTENERS)
def test_cross_site_simple_post_is_refused(site, who, scheme):
    """A cross-site ``text/plain`` POST with ``Origin`` (no preflight in a browser) that
    would stop the VM is 403 on every listener, and the VM runs on."""
    method, params = stop_vm(site, who)
    headers = [f"Origin: {EVIL}", "Content-Type: text/plain;charset=UTF-8"]
    status, _, body = exchange(
        site, site.uri(who, scheme), browser_post(method, params, headers)
    )
    assert (status, body, site.vm_state()) == (403, BROWSER_REFUSED, "running")


@pytest.mark.parametrize("who,scheme", LISTENERS)
def test_console_upgrade_with_origin_is_refused(site, who, scheme):
    """A WebSocket handshake for the VM's root console carrying a foreign ``Origin`` is
    403 and never 101: nothing is typed on the guest."""
    request = browser_upgrade(site.console(who), [f"Origin: {EVIL}"])
    status, head, body = exchange(site, site.uri(who, scheme), request)
    assert (status, body) == (403, BROWSER_REFUSED), head


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
def test_rebinding_is_refused(site, scheme):
    """After a DNS rebinding the page is same-origin to the listener (``Host`` and
    ``Origin`` of the attacker's name, ``application/json``): a heartbeat planting a
    node, a read of the fleet and the event stream are all 403; no node is planted."""
    uri = site.uri("explorer", scheme)
    port = parse_address(uri).port
    host = f"evil.example:{port}"
    headers = [f"Origin: http://{host}", "Content-Type: application/json"]
    plant = {"node_id": "planted", "socket_path": "tcp://127.0.0.1:9"}
    for method, params in (("explorer.heartbeat", plant), ("explorer.query_nodes", {})):
        request = browser_post(method, params, headers, host=host)
        status, _, body = exchange(site, uri, request)
        assert (status, body, site.node_ids()) == (403, BROWSER_REFUSED, [NODE])
    request = browser_upgrade("/v1/events?since=0", [f"Origin: http://{host}"], host=host)
    status, head, body = exchange(site, uri, request)
    assert (status, body) == (403, BROWSER_REFUSED), head


@pytest.mark.parametrize(
    "headers",
    [
        ["Sec-Fetch-Site: cross-site", "Sec-Fetch-Mode: no-cors"],
        ["sec-fetch-site: same-origin"],
        ["SEC-FETCH-DEST: empty"],
        ["ORIGIN: null"],
        ["Sec-Fetch-User: ?1"],
    ],
)
def test_fetch_metadata_alone_is_refused(site, headers):
    """A request with only fetch metadata (or an ``Origin`` of ``null``, from a
    sandboxed frame), whatever the header names' case, is 403; no VM is created."""
    before = site.vm_names()
    request = browser_post("vm.create", {**_VM, "name": "from-a-web-page"}, headers)
    status, _, body = exchange(site, site.uri("node", "tcp"), request)
    assert (status, body, site.vm_names()) == (403, BROWSER_REFUSED, before)


def test_refusals_are_counted_and_logged(site):
    """Refused browser requests are counted in ``hero_refusals_total{limit="browser"}``
    and logged rate-limited, on the explorer and on the node."""
    request = browser_post("explorer.info", {}, [f"Origin: {EVIL}"])
    for _ in range(3):
        assert exchange(site, site.ex["tcp"], request)[::2] == (403, BROWSER_REFUSED)
    samples = scrape(site.ex_metrics)
    assert samples[("hero_refusals_total", frozenset({("limit", "browser")}))] >= 3
    site.explorer.wait_for_line(r"refused \(browser\) a connection from 127\.0\.0\.1")
    request = browser_post("node.info", {}, [f"Origin: {EVIL}"])
    assert exchange(site, site.no["tcp"], request)[::2] == (403, BROWSER_REFUSED)
    samples = scrape(site.node_metrics)
    assert samples[("hero_refusals_total", frozenset({("limit", "browser")}))] >= 1
    site.node.wait_for_line(r"refused \(browser\) a connection from 127\.0\.0\.1")


@pytest.mark.parametrize("who,scheme", LISTENERS)
def test_programs_are_still_served(site, who, scheme):
    """Without ``Origin`` or a browser's fetch metadata (our clients, curl, Node.js's
    ``fetch`` with its lone ``Sec-Fetch-Mode``) requests are served on every listener,
    whatever their ``Content-Type``: JSON, curl's ``-d`` form type, none."""
    uri = site.uri(who, scheme)
    method = "explorer.info" if who == "explorer" else "node.info"
    if scheme == "tls":
        conn = tls_connect(uri, site.fleet["ca"], *site.fleet["client/ops"])
    else:
        conn = connect(uri)
    try:
        status, _, data = post(conn, {"jsonrpc": "2.0", "id": 1, "method": method})
        assert status == 200 and "result" in json.loads(data)
    finally:
        conn.close()
    undici = ["Content-Type: text/plain;charset=UTF-8", "Sec-Fetch-Mode: cors"]
    for headers in (["Content-Type: application/x-www-form-urlencoded"], [], undici):
        status, _, data = exchange(site, uri, browser_post(method, {}, headers))
        assert status == 200 and "result" in json.loads(data)


@pytest.mark.parametrize("who,scheme", [("explorer", "tcp"), ("node", "tls")])
def test_consoles_still_open_for_programs(site, who, scheme):
    """A WebSocket client that sends no ``Origin`` (ours, websocat) opens the console,
    through the explorer's relay (whose leg to the node sends none either) and on the
    node."""
    uri = site.uri(who, scheme)
    context = site.context() if scheme == "tls" else None
    client = WsClient(uri, site.console(who), context=context)
    client.close()


def test_the_cli_is_served_over_tcp(site):
    """The command line (our :class:`RpcClient`) calls the explorer over plain TCP."""
    done = subprocess.run(
        [sys.executable, "-m", "hero_compute.cli", "--explorer", site.ex["tcp"], "nodes"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert NODE in done.stdout


class _Page(http.server.BaseHTTPRequestHandler):
    """The attacker's page: any page will do, its script is the test's."""

    def do_GET(self):
        body = b"<!doctype html><title>a page on another origin</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


#: What the page's script does, as any web page may: a WebSocket, then a "simple"
#: cross-site POST (no preflight; its answer is opaque, but the call would have run).
_ATTACK = """
const [rpc, body, ws_url, done] = arguments;
const out = {};
new Promise((resolve) => {
  const ws = new WebSocket(ws_url);
  ws.onopen = () => { out.ws = "open"; ws.close(); };
  ws.onclose = () => { out.ws = out.ws || "refused"; resolve(); };
})
  .then(() => fetch(rpc, {method: "POST", mode: "no-cors", body: body,
                          headers: {"Content-Type": "text/plain"}}))
  .then(() => { out.post = "sent"; }, () => { out.post = "failed"; })
  .then(() => done(out));
"""


def test_a_real_browser_page_is_refused(site, browser):  # noqa: F811
    """In Chromium, a page of another origin opens the VM's console with a ``WebSocket``
    and stops the VM with a no-cors ``fetch``: both refused, the VM runs on, and the
    explorer counts both refusals."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = ("hero_refusals_total", frozenset({("limit", "browser")}))
    before = scrape(site.ex_metrics).get(key, 0)
    try:
        browser.get(f"http://127.0.0.1:{server.server_port}/")
        method, params = stop_vm(site, "explorer")
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        port = parse_address(site.ex["tcp"]).port
        out = browser.execute_async_script(
            _ATTACK,
            f"http://127.0.0.1:{port}/rpc",
            body,
            f"ws://127.0.0.1:{port}{site.console('explorer')}",
        )
    finally:
        server.shutdown()
        server.server_close()
    assert (out, site.vm_state()) == ({"post": "sent", "ws": "refused"}, "running")
    assert scrape(site.ex_metrics)[key] == before + 2


# In memory: what the parser does with a browser's header -------------------------------


def _memory(calls):
    rpc = Dispatcher()
    rpc.register("call", lambda: calls.append(1) or "done")
    proto = RpcHTTPFactory(rpc, clock=Clock()).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def test_a_pipelined_call_before_the_browser_one_is_answered():
    """Requests before a browser's on one connection are answered; the browser's is
    403 without its handler running, and the connection closes."""
    calls = []
    proto, transport = _memory(calls)
    ours = browser_post("call", {}, ["Content-Type: application/json"])
    theirs = browser_post("call", {}, [f"Origin: {EVIL}"])
    proto.dataReceived(ours + theirs)
    data = transport.value()
    assert calls == [1]
    assert data.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 403 Forbidden\r\n" in data
    assert data.endswith(BROWSER_REFUSED) and transport.disconnecting
    assert proto.factory.admission.refusals["browser"] == 1


def test_a_header_value_naming_origin_is_not_a_browser():
    """Only header names count: ``Origin`` in a value or another header's name is served."""
    calls = []
    proto, transport = _memory(calls)
    proto.dataReceived(browser_post("call", {}, ["X-Origin: a", "Referer: Origin: x"]))
    assert transport.value().startswith(b"HTTP/1.1 200 ") and calls == [1]
