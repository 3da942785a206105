"""
Attacks on this round's surface (console and event WebSockets, image imports, the audit
log, the PostgreSQL store) that worked before their fix, each made against real
processes and shown refused, with nothing changed.
"""

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from hero_compute import pki
from hero_compute.rpc.addresses import parse_address

from .support import result, rpc, start_tls_explorer
from .test_startup_errors import assert_clean_failure, run_twistd
from .wsclient import Refused, WsClient, refusal

PASSWORD = "s3cr%zzetpw"


@pytest.mark.parametrize(
    "uri",
    [
        # libpq echoes a bad percent-encoded token, and the whole URI for a bad
        # bracketed host, in its parse errors.
        f"postgresql://hero:{PASSWORD}@127.0.0.1:1/fleet",
        f"postgresql://hero:{PASSWORD}@[127.0.0.1:1/fleet",
    ],
)
def test_unparsable_database_uri_never_prints_its_password(tmp_path, uri):
    """An EXPLORER_DATABASE URI libpq cannot parse fails start-up without its password."""
    status, output = run_twistd(
        ["explorer"],
        {
            "HERO_SOCKET_DIR": str(tmp_path),
            "EXPLORER_STATE_DIR": str(tmp_path / "state"),
            "EXPLORER_DATABASE": uri,
        },
    )
    assert "s3cr" not in output, output
    assert_clean_failure(status, output, "postgresql://")


def test_proxied_image_import_is_audited_and_entries_stay_small(twistd, short_tmp):
    """A proxied ``image.import`` is recorded like a VM write, and a caller's huge
    method name or vm_id cannot write a huge audit entry."""
    explorer = twistd(
        ["explorer"],
        env={
            "HERO_SOCKET_DIR": short_tmp,
            "EXPLORER_STATE_DIR": f"{short_tmp}/state",
            "EXPLORER_TCP_ADDR": "127.0.0.1:0",
        },
    )
    tcp = next(u for u in explorer.listening(count=2) if u.startswith("tcp://"))
    unix = next(u for u in explorer.listening(count=2) if u.startswith("unix://"))
    pull = {"url": "http://example.org/a.img", "name": "a.img", "sha256": "0" * 64}
    answer = rpc(
        tcp,
        "explorer.call",
        {"node_id": "victim", "method": "image.import", "params": pull},
    )
    assert answer["error"]["code"] == -32001
    huge = "x" * 500_000
    answer = rpc(
        tcp,
        "explorer.call",
        {"node_id": "victim", "method": "vm." + huge, "params": {"vm_id": huge}},
    )
    assert answer["error"]["code"] == -32001
    entries = result(unix, "explorer.audit", {"node_id": "victim"})["entries"]
    assert [(e["method"], e["target"]) for e in entries][1] == ("image.import", "victim")
    assert entries[1]["caller"].startswith("tcp:127.0.0.1:")
    assert entries[0]["method"].startswith("vm.xxx")
    assert len(json.dumps(entries)) < 2000


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A fleet CA, an explorer, a client and a node certificate."""
    base = tmp_path_factory.mktemp("pki")
    ca = str(base / "ca")
    pki.create_ca(ca)
    out = {"ca": f"{ca}/ca.pem"}
    for role, name in (("explorer", "e1"), ("client", "ops"), ("node", "n-a")):
        out[f"{role}/{name}"] = pki.create_cert(
            ca, role, name, ips=["127.0.0.1"], out=str(base / f"{role}-{name}")
        )
    return out


def tls_context(fleet, who):
    """A client SSL context presenting ``who``'s certificate (None: none)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(fleet["ca"])
    if who is not None:
        context.load_cert_chain(*fleet[who])
    return context


def opened(uri, path):
    """A WebSocket at ``path``, once the connections just closed are let go of."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return WsClient(uri, path, timeout=3)
        except (ConnectionError, OSError):
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_event_stream_readers_and_their_limits(twistd, short_tmp, fleet):
    """Only those who may query the fleet read events (no node/* certificate, no TLS
    peer without one); a bad since is 400; open streams count against the per-address
    limit, and the Unix socket is served all the while."""
    explorer = start_tls_explorer(
        twistd, short_tmp, fleet, signing=False, HERO_MAX_CONNS_PER_ADDR="3"
    )
    unix, tcp, tls = explorer.unix, explorer.tcp, explorer.tls
    for who in ("node/n-a", None):
        with pytest.raises(Refused) as refused:
            WsClient(tls, "/v1/events", context=tls_context(fleet, who))
        assert refused.value.status == 403
    WsClient(tls, "/v1/events", context=tls_context(fleet, "client/ops")).close()
    for since in ("x", "1e3", "9" * 5000, "0x10"):
        assert refusal(tcp, f"/v1/events?since={since}") == 400
    held = [opened(tcp, "/v1/events?since=-5") for _ in range(3)]
    with pytest.raises((ConnectionError, OSError, Refused)):
        WsClient(tcp, "/v1/events", timeout=3).close()
    assert "result" in rpc(unix, "explorer.info")
    held.pop().close()
    opened(tcp, "/v1/events").close()
    for client in held:
        client.close()


@pytest.fixture
def hostile_node():
    """A TCP server on loopback that refuses every request with HTTP 409 and a body a
    terminal would obey (a title change, a screen clear) and that names itself."""
    body = b"\x1b]0;PWNED\x07\x1b[2J" + b"node-chosen words " * 200
    head = b"HTTP/1.1 409 Conflict\r\ncontent-length: %d\r\n\r\n" % len(body)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(head + body)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def test_a_node_refusal_body_never_reaches_the_console_caller(
    twistd, short_tmp, hostile_node
):
    """A node refusing a console through the explorer passes on its status only: none
    of its bytes (escape sequences, its own words) reach the caller."""
    explorer = twistd(
        ["explorer"],
        env={"HERO_SOCKET_DIR": short_tmp, "EXPLORER_STATE_DIR": f"{short_tmp}/state"},
    )
    unix = explorer.listening(count=1)[0]
    beat = {"node_id": "evil", "socket_path": f"tcp://127.0.0.1:{hostile_node}"}
    assert result(unix, "explorer.heartbeat", beat)["accepted"] is True
    with pytest.raises(Refused) as refused:
        WsClient(unix, "/v1/nodes/evil/vms/v1/console")
    assert refused.value.status == 409
    assert b"\x1b" not in refused.value.body
    assert b"PWNED" not in refused.value.body
    assert b"node-chosen" not in refused.value.body
    assert b"not running" in refused.value.body


def qemu_img(*args):
    """Run ``qemu-img`` with these arguments."""
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_a_base_image_cannot_reach_host_files(twistd, short_tmp):
    """A base image in the image directory whose backing file, external data file or
    extents name a host file (the node's own TLS key here) is refused at vm.create,
    and no VM, directory or disk is left behind."""
    state = f"{short_tmp}/st"
    images = f"{state}/images"
    os.makedirs(images)
    secret = f"{short_tmp}/node-key.pem"
    with open(secret, "wb") as f:
        f.write(b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 4000)
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        secret,
        "-F",
        "raw",
        f"{images}/backed.qcow2",
        "1M",
    )
    # data_file makes qemu-img write into the file it names: a copy, then renamed.
    victim = f"{short_tmp}/victim.raw"
    shutil.copy(secret, victim)
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"data_file={victim},data_file_raw=on",
        f"{images}/datafile.qcow2",
        "1M",
    )
    with open(f"{images}/extents.vmdk", "w") as f:
        f.write(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
            f'createType="monolithicFlat"\nRW 8 FLAT "{secret}" 0\n'
        )
    node = twistd(
        [
            "node",
            "--socket",
            f"{short_tmp}/n.sock",
            "--state-dir",
            state,
            "--interval",
            "60",
        ],
        env={"HOME": short_tmp},
    )
    uri = node.listening()[0]
    vm = {"name": "vm", "vcpus": 1, "memory_mb": 64, "disk_gb": 1}
    for name, code in (
        ("backed.qcow2", -32010),
        ("datafile.qcow2", -32010),
        ("extents.vmdk", -32602),
    ):
        answer = rpc(uri, "vm.create", {**vm, "image": f"{images}/{name}"}, timeout=60)
        assert answer.get("error", {}).get("code") == code, (name, answer)
    assert result(uri, "vm.list") == []
    assert not os.listdir(f"{state}/vms") if os.path.isdir(f"{state}/vms") else True


@pytest.fixture
def silent_node():
    """A TCP server on loopback that takes connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server.getsockname()[1]
    server.close()


def rss_kib(pid):
    """:return: the resident set size of process ``pid``, in KiB"""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1])


def test_bytes_after_a_queued_upgrade_are_bounded(twistd, short_tmp, silent_node):
    """A client that pipelines a slow call, then an upgrade, then streams data is cut
    off once what waits for the upgrade passes 64 KiB: the explorer's memory does not
    grow with what it sends, and the explorer keeps serving."""
    explorer = twistd(
        ["explorer"],
        env={
            "HERO_SOCKET_DIR": short_tmp,
            "EXPLORER_STATE_DIR": f"{short_tmp}/state",
            "EXPLORER_TCP_ADDR": "127.0.0.1:0",
        },
    )
    uris = explorer.listening(count=2)
    unix = next(u for u in uris if u.startswith("unix://"))
    tcp = parse_address(next(u for u in uris if u.startswith("tcp://")))
    beat = {"node_id": "slow", "socket_path": f"tcp://127.0.0.1:{silent_node}"}
    assert result(unix, "explorer.heartbeat", beat)["accepted"] is True
    call = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "explorer.call",
            "params": {"node_id": "slow", "method": "node.info"},
        }
    ).encode()
    head = (
        b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(call), call)
    ) + (
        b"GET /v1/events HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    before = rss_kib(explorer.process.pid)
    sent = 0
    chunk = b"\x00" * (1 << 20)
    with socket.create_connection((tcp.host, tcp.port), timeout=5) as sock:
        sock.sendall(head)
        try:
            while sent < 300 * len(chunk):
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        grown = rss_kib(explorer.process.pid) - before
    assert sent < 300 * len(chunk), "the explorer read every byte"
    assert grown < 64 * 1024, f"{grown} KiB more after {sent} bytes"
    assert "result" in rpc(unix, "explorer.info")


@pytest.fixture
def boasting_node():
    """A TCP server on loopback answering every JSON-RPC call with a 3 MB ``vm_id``."""
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "result": {"vm_id": "v" * 3_000_000}}
    ).encode()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    head, _, rest = data.partition(b"\r\n\r\n")
                    length = int(
                        next(
                            line.split(b":")[1]
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length:")
                        )
                    )
                    while len(rest) < length:
                        rest += conn.recv(65536)
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n"
                        % len(body)
                        + body
                    )
                except (OSError, StopIteration, ValueError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def test_a_node_answer_cannot_fill_the_event_ring(twistd, short_tmp, boasting_node):
    """Events made from proxied calls keep a node's (or a caller's) oversized vm_id out:
    each kept event stays small, whatever the node answered."""
    explorer = twistd(
        ["explorer"],
        env={
            "HERO_SOCKET_DIR": short_tmp,
            "EXPLORER_STATE_DIR": f"{short_tmp}/state",
            "EXPLORER_TCP_ADDR": "127.0.0.1:0",
        },
    )
    uris = explorer.listening(count=2)
    unix = next(u for u in uris if u.startswith("unix://"))
    tcp = next(u for u in uris if u.startswith("tcp://"))
    beat = {"node_id": "big", "socket_path": f"tcp://127.0.0.1:{boasting_node}"}
    assert result(unix, "explorer.heartbeat", beat)["accepted"] is True
    for _ in range(3):
        answer = rpc(
            tcp,
            "explorer.call",
            {"node_id": "big", "method": "vm.start", "params": {"vm_id": "w" * 100}},
            timeout=30,
        )
        assert "result" in answer, str(answer)[:300]
    reader = WsClient(unix, "/v1/events?since=0", timeout=10)
    try:
        deadline = time.monotonic() + 10
        while reader.received.count(b"vm.started") < 3:
            assert time.monotonic() < deadline, bytes(reader.received[:300])
            reader.pump(deadline)
    finally:
        reader.close()
    assert len(reader.received) < 10_000


def test_console_path_tricks_and_bare_upgrades_are_refused(twistd, short_tmp):
    """Console paths with dot segments, encoded characters or an overlong id are 404,
    an upgrade without its WebSocket headers is 400, and the node keeps serving."""
    node = twistd(
        [
            "node",
            "--socket",
            f"{short_tmp}/n.sock",
            "--state-dir",
            f"{short_tmp}/st",
            "--interval",
            "60",
        ],
        env={"HOME": short_tmp, "NODE_TCP_ADDR": "127.0.0.1:0"},
    )
    uris = node.listening(count=2)
    unix = next(u for u in uris if u.startswith("unix://"))
    tcp = parse_address(next(u for u in uris if u.startswith("tcp://")))
    for path in (
        "/v1/vms/../console",
        "/v1/vms/%2e%2e/console",
        "/v1/vms/a%2Fb/console",
        "/v1/vms/" + "a" * 65 + "/console",
        "/v1/vms/v1/console/../../../rpc",
        "/v1/vms/nope/console",
    ):
        assert refusal(tcp.uri, path) == 404, path
    with socket.create_connection((tcp.host, tcp.port), timeout=5) as sock:
        sock.sendall(
            b"GET /v1/vms/nope/console HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n"
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")
    assert result(unix, "vm.list") == []
