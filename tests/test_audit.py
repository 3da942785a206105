"""
The audit log (CONTRACT §10), from the outside: every audited method called over a real
socket to a real ``twistd explorer`` by each kind of caller, then read back with
``explorer.audit`` and ``hero-compute audit``; no secret in any entry.
"""

import json
import os
import subprocess
import sys

import pytest

from hero_compute import pki

from .support import ROOT, result, rpc, rpc_over, start_tls_explorer, tls_connect


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A fleet CA, an explorer, a client and a node certificate."""
    base = tmp_path_factory.mktemp("pki")
    ca = str(base / "ca")
    pki.create_ca(ca)
    out = {"ca": f"{ca}/ca.pem", "ca_key": f"{ca}/ca-key.pem"}
    for role, name in (("explorer", "e1"), ("client", "ops"), ("node", "n-a")):
        out[f"{role}/{name}"] = pki.create_cert(
            ca, role, name, ips=["127.0.0.1"], out=str(base / f"{role}-{name}")
        )
    return out


@pytest.fixture
def explorer(twistd, short_tmp, fleet):
    """A real explorer on Unix, plain TCP and mutual TLS (loopback), able to sign."""
    return start_tls_explorer(twistd, short_tmp, fleet)


def over_tls(explorer, fleet, who, method, params):
    """One call over mutual TLS as ``who`` (a certificate name, or None); the response."""
    cert, key = fleet[who] if who else (None, None)
    conn = tls_connect(explorer.tls, fleet["ca"], cert, key)
    try:
        return rpc_over(conn, method, params), conn.sock.getsockname()
    finally:
        conn.close()


def test_every_audited_method_with_its_caller_and_no_secret(explorer, fleet):
    """Tokens, enrollment, renewal, revocation, removal and proxied VM writes are each
    recorded once with the right caller, target and outcome; reads and heartbeats are
    not; no token, secret, CSR or key appears in any entry."""
    uid = f"unix:{os.getuid()}"
    token = result(explorer.unix, "explorer.create_token", {"node_id": "n-new"})["token"]
    csr_key = pki.make_key()
    csr = pki.make_csr(csr_key, "n-new").decode()
    enrolled, _ = over_tls(
        explorer, fleet, None, "explorer.enroll", {"token": token, "csr": csr}
    )
    assert "result" in enrolled
    revoked, _ = over_tls(
        explorer, fleet, "client/ops", "explorer.revoke", {"node_id": "n-x"}
    )
    assert revoked["result"] is True
    assert (
        rpc(explorer.unix, "explorer.remove_node", {"node_id": "ghost"})["error"]["code"]
        == -32001
    )
    vm_write = rpc(
        explorer.tcp,
        "explorer.call",
        {"node_id": "nope", "method": "vm.start", "params": {"vm_id": "v1"}},
    )
    assert vm_write["error"]["code"] == -32001
    rpc(explorer.tcp, "explorer.call", {"node_id": "nope", "method": "vm.list"})
    renewed, _ = over_tls(
        explorer,
        fleet,
        "node/n-a",
        "explorer.renew",
        {"csr": pki.make_csr(pki.make_key(), "n-a").decode()},
    )
    assert "result" in renewed
    secret = "ab" * 32
    assert "result" in rpc(
        explorer.unix,
        "explorer.heartbeat",
        {"node_id": "n-hb", "socket_path": "unix:///tmp/x.sock", "secret": secret},
    )

    entries = result(explorer.unix, "explorer.audit")["entries"]
    seen = [(e["method"], e["caller"], e["target"], e["outcome"]) for e in entries]
    assert seen == [
        ("explorer.renew", "spiffe://hero-compute/node/n-a", "n-a", "ok"),
        ("vm.start", seen[1][1], "nope/v1", "error -32001"),
        ("explorer.remove_node", uid, "ghost", "error -32001"),
        ("explorer.revoke", "spiffe://hero-compute/client/ops", "n-x", "ok"),
        ("explorer.enroll", seen[4][1], "n-new", "ok"),
        ("explorer.create_token", uid, "n-new", "ok"),
    ]
    assert seen[1][1].startswith("tcp:127.0.0.1:")
    assert seen[4][1].startswith("tls:127.0.0.1:")
    text = json.dumps(entries)
    for secret_text in (token, token.split(".")[-1], secret, csr, "BEGIN"):
        assert secret_text not in text
    assert all(e["explorer"] and e["time"] > 0 for e in entries)
    only = result(explorer.unix, "explorer.audit", {"node_id": "nope", "limit": 5})
    assert [e["target"] for e in only["entries"]] == ["nope/v1"]


def test_cli_audit(explorer):
    """``hero-compute audit --node N --json`` prints that node's entries; a table by
    default names the columns."""
    result(explorer.unix, "explorer.revoke", {"node_id": "n-cli"})
    result(explorer.unix, "explorer.revoke", {"node_id": "n-other"})
    env = {**os.environ, "PYTHONPATH": ROOT}
    base = [sys.executable, "-m", "hero_compute.cli", "--explorer", explorer.unix]
    done = subprocess.run(
        [*base, "audit", "--node", "n-cli", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)["entries"]
    assert [(e["method"], e["target"]) for e in entries] == [("explorer.revoke", "n-cli")]
    done = subprocess.run(
        [*base, "audit", "--table", "--limit", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "CALLER" in done.stdout and "n-other" in done.stdout
    assert "n-cli" not in done.stdout


def test_console_attach_is_audited(explorer):
    """Opening a VM console through the explorer is recorded with its caller and
    outcome, here refused (no such node)."""
    from .wsclient import refusal

    assert refusal(explorer.unix, "/v1/nodes/nope/vms/v1/console") == 404
    entries = result(explorer.unix, "explorer.audit", {"node_id": "nope"})["entries"]
    assert [(e["method"], e["target"], e["outcome"], e["caller"]) for e in entries] == [
        ("console.attach", "nope/v1", "refused 404", f"unix:{os.getuid()}")
    ]


def test_placements_are_audited_with_their_outcome(explorer):
    """``explorer.place`` and ``explorer.create_vm`` are recorded with the outcome
    they had, not the moment they were called: with no node to place on, each is
    ``error -32006``."""
    ask = {"vcpus": 1, "memory_mb": 64, "disk_gb": 1}
    for method, params in (
        ("explorer.place", ask),
        ("explorer.create_vm", dict(ask, name="web", user_data="#cloud-config\n")),
    ):
        answer = rpc(explorer.unix, method, params)
        assert answer["error"]["code"] == -32006, answer
    entries = result(explorer.unix, "explorer.audit", {"limit": 10})["entries"]
    got = {e["method"]: (e["target"], e["outcome"]) for e in entries}
    assert got["explorer.place"] == ("", "error -32006")
    assert got["explorer.create_vm"] == ("web", "error -32006")
    assert "cloud-config" not in json.dumps(entries)


def test_arguments_by_name_are_binds():
    """A handler's arguments by name are what inspect's bind gives, by name or by
    position, and what does not fit raises TypeError as bind does."""
    import inspect

    from hero_compute.explorer.audit import arguments_by_name

    def handler(node_id, method, params=None):
        return None

    named = arguments_by_name(inspect.signature(handler))
    assert named((), {"node_id": "n1", "method": "vm.start"}) == {
        "node_id": "n1",
        "method": "vm.start",
    }
    assert named(("n1",), {"method": "m"}) == {"node_id": "n1", "method": "m"}
    for args, kwargs in (((), {"method": "m"}), ((), {"node_id": "n", "x": 1})):
        with pytest.raises(TypeError):
            named(args, kwargs)
