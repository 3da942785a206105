"""
Fleet trust against a real ``twistd explorer`` (CONTRACT §6), made from the attacker's
side: each attack is made over a real socket, refused, and the registry shown unchanged.
"""

import json
import os
import secrets
import socket
import ssl
import threading

import pytest
from cryptography import x509

from hero_compute import pki

from .support import (
    past,
    result,
    rpc,
    rpc_over,
    start_tls_explorer,
    tls_connect,
    wait_for,
)

ID_A, ID_B = "node-a", "node-b"


@pytest.fixture
def explorer(twistd, short_tmp, fleet):
    """A real explorer on Unix, plain TCP and mutual TLS (loopback), able to sign."""
    return start_tls_explorer(twistd, short_tmp, fleet)


def as_(fleet, explorer, who):
    """A TLS connection to the explorer presenting ``who``'s certificate (or none)."""
    cert, key = fleet[who] if who else (None, None)
    return tls_connect(explorer.tls, fleet["ca"], cert, key)


def call(fleet, explorer, who, method, params=None):
    """One call over TLS as ``who``; the whole response."""
    conn = as_(fleet, explorer, who)
    try:
        return rpc_over(conn, method, params)
    finally:
        conn.close()


def heartbeat(node_id, address, secret=None):
    """A heartbeat's params."""
    params = {"node_id": node_id, "socket_path": address, "name": node_id}
    if secret is not None:
        params["secret"] = secret
    return params


def refused(response):
    """Whether a response is the -32010 refusal."""
    return response.get("error", {}).get("code") == -32010


def nodes(explorer):
    """The registry as the operator sees it, over the Unix socket."""
    return {n["node_id"]: n for n in result(explorer.unix, "explorer.list_nodes")}


def test_node_certificate_heartbeats_only_as_itself(fleet, explorer):
    """node/a's certificate heartbeats as a, but not as b: refused, b never appears."""
    ok = call(
        fleet,
        explorer,
        f"node/{ID_A}",
        "explorer.heartbeat",
        heartbeat(ID_A, "tls://127.0.0.1:9"),
    )
    assert ok["result"]["accepted"] is True
    assert nodes(explorer)[ID_A]["transport"] == "tls"
    attack = call(
        fleet,
        explorer,
        f"node/{ID_A}",
        "explorer.heartbeat",
        heartbeat(ID_B, "tls://127.0.0.1:9"),
    )
    assert refused(attack)
    assert ID_B not in nodes(explorer)


def test_node_certificate_cannot_call_remove_or_list(fleet, explorer):
    """A node certificate may not drive other nodes, remove them, or read the fleet."""
    call(
        fleet,
        explorer,
        f"node/{ID_A}",
        "explorer.heartbeat",
        heartbeat(ID_A, "tls://127.0.0.1:9"),
    )
    before = nodes(explorer)
    for method, params in (
        ("explorer.call", {"node_id": ID_A, "method": "vm.list"}),
        ("explorer.remove_node", {"node_id": ID_A}),
        ("explorer.list_nodes", None),
        ("explorer.create_token", None),
        ("explorer.revoke", {"node_id": ID_A}),
    ):
        assert refused(call(fleet, explorer, f"node/{ID_B}", method, params)), method
    assert nodes(explorer) == before


def test_tls_without_certificate_may_only_enroll(fleet, explorer):
    """A TLS peer without a certificate gets rpc.discover and enroll, nothing else."""
    assert "result" in call(fleet, explorer, None, "rpc.discover")
    for method, params in (
        ("explorer.list_nodes", None),
        ("explorer.heartbeat", heartbeat("x", "tls://127.0.0.1:9")),
        ("explorer.info", None),
    ):
        assert refused(call(fleet, explorer, None, method, params)), method
    assert "x" not in nodes(explorer)


def test_certificate_of_another_ca_fails_the_handshake(fleet, explorer):
    """A client certificate from another CA is refused in the handshake."""
    conn = as_(fleet, explorer, "stranger")
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        rpc_over(conn, "explorer.list_nodes")
    conn.close()


def test_plain_tcp_cannot_remove_revoke_or_mint(fleet, explorer):
    """Over plain TCP, remove_node, revoke and create_token are refused; nothing changes."""
    result(explorer.unix, "explorer.heartbeat", heartbeat(ID_A, "unix:///tmp/a.sock"))
    for method, params in (
        ("explorer.remove_node", {"node_id": ID_A}),
        ("explorer.revoke", {"node_id": ID_A}),
        ("explorer.create_token", {}),
    ):
        assert refused(rpc(explorer.tcp, method, params)), method
    assert ID_A in nodes(explorer)


def test_plain_tcp_heartbeat_with_another_secret_is_refused(fleet, explorer):
    """A node id bound to its secret cannot be heartbeated or left by another peer over
    TCP, even after an explorer restart; the record keeps its address."""
    secret = secrets.token_hex(32)
    assert "result" in rpc(
        explorer.tcp, "explorer.heartbeat", heartbeat(ID_A, "tcp://127.0.0.1:7001", secret)
    )
    for attack in (
        heartbeat(ID_A, "tcp://127.0.0.1:6666", secrets.token_hex(32)),
        heartbeat(ID_A, "tcp://127.0.0.1:6666"),
    ):
        assert refused(rpc(explorer.tcp, "explorer.heartbeat", attack))
    assert refused(
        rpc(
            explorer.tcp,
            "explorer.leave",
            {"node_id": ID_A, "secret": secrets.token_hex(32)},
        )
    )
    node = nodes(explorer)[ID_A]
    assert node["socket_path"] == "tcp://127.0.0.1:7001" and node["status"] == "online"

    explorer.stop()
    again = type(explorer)(["explorer"], env=explorer.env)
    try:
        uris = again.listening(count=3)
        unix = next(u for u in uris if u.startswith("unix://"))
        tcp = next(u for u in uris if u.startswith("tcp://"))
        kept = {n["node_id"]: n for n in result(unix, "explorer.list_nodes")}
        assert kept[ID_A]["status"] == "offline"
        assert kept[ID_A]["socket_path"] == "tcp://127.0.0.1:7001"
        assert refused(
            rpc(
                tcp,
                "explorer.heartbeat",
                heartbeat(ID_A, "tcp://127.0.0.1:6666", secrets.token_hex(32)),
            )
        )
        assert "result" in rpc(
            tcp, "explorer.heartbeat", heartbeat(ID_A, "tcp://127.0.0.1:7001", secret)
        )
    finally:
        again.stop()


def test_remove_by_an_operator_unbinds(fleet, explorer):
    """An operator (Unix socket) removing a node lets a new secret bind its id."""
    first, second = secrets.token_hex(32), secrets.token_hex(32)
    rpc(explorer.tcp, "explorer.heartbeat", heartbeat(ID_A, "tcp://127.0.0.1:7001", first))
    assert result(explorer.unix, "explorer.remove_node", {"node_id": ID_A}) is True
    assert "result" in rpc(
        explorer.tcp, "explorer.heartbeat", heartbeat(ID_A, "tcp://127.0.0.1:7002", second)
    )
    assert refused(
        rpc(
            explorer.tcp,
            "explorer.heartbeat",
            heartbeat(ID_A, "tcp://127.0.0.1:7003", first),
        )
    )


def _csr(node_id):
    key = pki.make_key()
    return key, pki.make_csr(key, node_id).decode()


def test_enrollment_by_token(fleet, explorer):
    """A token enrolls exactly one node: a certificate for that id, signed by the fleet
    CA; the token cannot be used twice, nor for another id."""
    token = result(explorer.unix, "explorer.create_token", {"node_id": "fresh"})["token"]
    _, wrong = _csr("other")
    assert refused(
        call(fleet, explorer, None, "explorer.enroll", {"token": token, "csr": wrong})
    )
    _, csr = _csr("fresh")
    enrolled = call(fleet, explorer, None, "explorer.enroll", {"token": token, "csr": csr})
    cert = x509.load_pem_x509_certificate(enrolled["result"]["certificate"].encode())
    assert pki.uri_sans(cert) == ["spiffe://hero-compute/node/fresh"]
    ca = x509.load_pem_x509_certificate(enrolled["result"]["ca"].encode())
    cert.verify_directly_issued_by(ca)
    again = call(fleet, explorer, None, "explorer.enroll", {"token": token, "csr": csr})
    assert refused(again) and "invalid or expired token" in again["error"]["message"]


def test_expired_token_is_refused(fleet, explorer):
    """A token past its time enrolls nobody."""
    made = result(explorer.unix, "explorer.create_token", {"ttl": 1})
    token = made["token"]
    past(made["expires_at"])  # a token's shortest life is one second
    _, csr = _csr("late")
    assert refused(
        call(fleet, explorer, None, "explorer.enroll", {"token": token, "csr": csr})
    )


def _write_pair(directory, name, cert_pem, key):
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_text(cert_pem)
    key_path.write_bytes(pki.dump_private_key(key))
    return str(cert_path), str(key_path)


def test_renewal_and_revocation(fleet, explorer, tmp_path):
    """An enrolled node renews with its certificate; once revoked, neither its
    certificates nor its secret are accepted, and it is offline."""
    token = result(explorer.unix, "explorer.create_token", {})["token"]
    key, csr = _csr("renewer")
    pem = call(fleet, explorer, None, "explorer.enroll", {"token": token, "csr": csr})[
        "result"
    ]["certificate"]
    first = _write_pair(tmp_path, "first", pem, key)
    fleet["node/renewer"] = first
    assert call(
        fleet,
        explorer,
        "node/renewer",
        "explorer.heartbeat",
        heartbeat("renewer", "tls://127.0.0.1:9"),
    )["result"]["accepted"]
    # Enrolled: plain TCP may no longer speak for it, whatever the secret.
    assert refused(
        rpc(
            explorer.tcp,
            "explorer.heartbeat",
            heartbeat("renewer", "tcp://127.0.0.1:9", secrets.token_hex(32)),
        )
    )
    new_key, new_csr = _csr("renewer")
    renewed = call(fleet, explorer, "node/renewer", "explorer.renew", {"csr": new_csr})
    fleet["node/renewer2"] = _write_pair(
        tmp_path, "second", renewed["result"]["certificate"], new_key
    )
    assert "result" in call(
        fleet,
        explorer,
        "node/renewer2",
        "explorer.heartbeat",
        heartbeat("renewer", "tls://127.0.0.1:9"),
    )

    assert result(explorer.unix, "explorer.revoke", {"node_id": "renewer"}) is True
    assert nodes(explorer)["renewer"]["status"] == "offline"
    for who in ("node/renewer", "node/renewer2"):
        assert refused(
            call(
                fleet,
                explorer,
                who,
                "explorer.heartbeat",
                heartbeat("renewer", "tls://127.0.0.1:9"),
            )
        ), who
    assert nodes(explorer)["renewer"]["status"] == "offline"


class SilentTLSNode:
    """A TLS server holding some node's certificate that records every byte it gets."""

    def __init__(self, cert, key, ca):
        self.received = b""
        self.accepted = self.ended = 0
        self._lock = threading.Lock()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.load_verify_locations(ca)
        self.context.verify_mode = ssl.CERT_OPTIONAL
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _accept(self):
        """:return: the next connection, or None once closed"""
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return None
        with self._lock:
            self.accepted += 1
        return conn

    def _end(self):
        with self._lock:
            self.ended += 1

    def all_ended(self):
        """
        Whether every connection made to it has ended: whatever a peer sent on them has
        been received, since a peer's bytes come before its close.
        """
        with self._lock:
            return self.accepted > 0 and self.ended == self.accepted

    def _serve(self):
        while conn := self._accept():
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(3)
                    while data := tls.recv(65536):
                        self.received += data
            except (OSError, ssl.SSLError):
                pass
            finally:
                self._end()

    def close(self):
        self.sock.close()


def test_proxy_refuses_a_node_whose_certificate_names_another(fleet, explorer):
    """The explorer calls node a at an address where node b's certificate answers: the
    handshake fails (-32003) and not one byte of the call reaches that peer."""
    impostor = SilentTLSNode(*fleet[f"node/{ID_B}"], fleet["ca"])
    try:
        call(
            fleet,
            explorer,
            f"node/{ID_A}",
            "explorer.heartbeat",
            heartbeat(ID_A, f"tls://127.0.0.1:{impostor.port}"),
        )
        answer = rpc(
            explorer.unix,
            "explorer.call",
            {"node_id": ID_A, "method": "vm.list", "params": {"secret": "x"}},
        )
        assert answer["error"]["code"] == -32003
        assert impostor.received == b""
    finally:
        impostor.close()


def test_non_json_reply_bytes_never_reach_the_caller(explorer):
    """A 'node' whose address answers something that is not JSON-RPC: the error says
    what happened, with none of its bytes."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    leak = b"root:$6$SECRET-HASH:19000:0:99999:7:::"

    def serve():
        conn, _ = sock.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(leak), leak))
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        result(
            explorer.unix,
            "explorer.heartbeat",
            heartbeat("leaky", f"tcp://127.0.0.1:{port}"),
        )
        answer = rpc(
            explorer.unix, "explorer.call", {"node_id": "leaky", "method": "vm.list"}
        )
        assert answer["error"]["code"] == -32003
        text = json.dumps(answer)
        assert "SECRET" not in text and "root" not in text
        assert f"{len(leak)} bytes" in answer["error"]["message"]
    finally:
        sock.close()


def test_state_file_is_private(explorer):
    """explorer.db is 0600 in a 0700 directory."""
    state = explorer.env["EXPLORER_STATE_DIR"]
    wait_for(lambda: os.path.exists(f"{state}/explorer.db"), what="explorer.db")
    assert os.stat(f"{state}/explorer.db").st_mode & 0o777 == 0o600
    assert os.stat(state).st_mode & 0o777 == 0o700


def cli(*args, env=None):
    """Run the hero-compute CLI as a process; (exit status, stdout, stderr)."""
    import subprocess
    import sys

    from .support import ROOT

    done = subprocess.run(
        [sys.executable, "-m", "hero_compute.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin", **(env or {})},
    )
    return done.returncode, done.stdout, done.stderr


def test_cli_over_tls_and_tokens(fleet, explorer):
    """The CLI reaches a TLS explorer with a client certificate given as a prefix (or
    through HERO_*), is refused without one, and mints tokens only where it may."""
    prefix = fleet["client/ops"][0][: -len(".pem")]
    result(explorer.unix, "explorer.heartbeat", heartbeat(ID_A, "unix:///tmp/a.sock"))
    code, out, err = cli(
        "--explorer", explorer.tls, "--ca", fleet["ca"], "--cert", prefix, "nodes", "--json"
    )
    assert code == 0, err
    assert [n["node_id"] for n in json.loads(out)] == [ID_A]
    code, out, err = cli(
        "--explorer",
        explorer.tls,
        "nodes",
        "--json",
        env={
            "HERO_CA": fleet["ca"],
            "HERO_CERT": fleet["client/ops"][0],
            "HERO_KEY": fleet["client/ops"][1],
        },
    )
    assert code == 0 and json.loads(out)[0]["node_id"] == ID_A, err
    code, _, err = cli("--explorer", explorer.tls, "--ca", fleet["ca"], "nodes", "--json")
    assert code == 4 and "not allowed" in err
    code, out, err = cli(
        "--explorer", explorer.unix, "token", "create", "--ttl", "10m", "--node-id", "n9"
    )
    assert code == 0, err
    token = out.strip()
    assert "\n" not in token and len(token) > 30
    _, csr = _csr("n9")
    assert "result" in call(
        fleet, explorer, None, "explorer.enroll", {"token": token, "csr": csr}
    )
    code, _, err = cli("--explorer", explorer.tcp, "token", "create")
    assert code == 4, err
    code, _, err = cli("--explorer", explorer.tls, "nodes")
    assert code == 64 and "--ca" in err


def test_real_renewal_of_a_short_lived_certificate(twistd, short_tmp, fleet):
    """With certificates of 6 s, a real node renews at two thirds of their life, again
    and again, and stays online over TLS well past its first certificate's end."""
    import time

    cert, key = fleet["explorer/e1"]
    explorer = twistd(
        ["explorer"],
        env={
            "HERO_SOCKET_DIR": short_tmp,
            "EXPLORER_STATE_DIR": f"{short_tmp}/state",
            "EXPLORER_TLS_ADDR": "127.0.0.1:0",
            "EXPLORER_TLS_CERT": cert,
            "EXPLORER_TLS_KEY": key,
            "EXPLORER_TLS_CA": fleet["ca"],
            "EXPLORER_CA_KEY": fleet["ca_key"],
            "EXPLORER_NODE_CERT_TTL": "6",
            "NODE_OFFLINE_AFTER": "2",
        },
    )
    uris = explorer.listening(count=2)
    unix = next(u for u in uris if u.startswith("unix://"))
    tls = next(u for u in uris if u.startswith("tls://"))
    token = result(unix, "explorer.create_token", {})["token"]
    node = twistd(
        ["node", "--socket", f"{short_tmp}/n.sock"],
        env={
            "HERO_STATE_DIR": f"{short_tmp}/node",
            "EXPLORER_ADDRESSES": tls,
            "NODE_TLS_ADDR": "127.0.0.1:0",
            "NODE_JOIN_TOKEN": token,
            "NODE_CA_PIN": pki.spki_pin(pki.load_certificate(fleet["ca"])),
            "NODE_ID": "short",
            "HEARTBEAT_INTERVAL": "0.5",
        },
    )
    wait_for(
        lambda: nodes(explorer_at(unix)).get("short", {}).get("status") == "online",
        timeout=20,
        what="the node enrolled and online",
    )
    first = pki.load_certificate(f"{short_tmp}/node/tls/node.pem").serial_number
    started = time.monotonic()
    node.wait_for_line(r"certificate renewed", timeout=15, count=2)
    assert time.monotonic() - started > 2  # not before two thirds of its life
    assert pki.load_certificate(f"{short_tmp}/node/tls/node.pem").serial_number != first
    renewed_at = time.time()
    wait_for(
        lambda: nodes(explorer_at(unix))["short"]["last_seen"] > renewed_at + 0.5,
        what="heartbeats on the renewed certificate",
    )
    assert nodes(explorer_at(unix))["short"]["status"] == "online"
    assert (
        result(unix, "explorer.call", {"node_id": "short", "method": "node.info"})[
            "node_id"
        ]
        == "short"
    )


def explorer_at(unix):
    """Something :func:`nodes` can read the registry of."""

    class At:
        pass

    at = At()
    at.unix = unix
    return at
