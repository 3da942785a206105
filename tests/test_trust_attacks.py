"""
Issue 17's attacks on fleet trust, made from the attacker's side against a real
``twistd explorer`` (Unix, TCP and TLS listeners) and real nodes: a generic join token
against ids the explorer knows, a revoked or superseded node key at a node's address,
revocation undone by re-enrollment and removal, and renew/enroll over the wrong
transport.  Each is refused, and the registry, identities and revocations are shown
unchanged.
"""

import json
import os
import re
import sqlite3
import ssl
import threading
import time

import pytest

from hero_compute import pki

from . import test_trust
from .support import result, rpc, start_tls_explorer, wait_for
from .test_trust import SilentTLSNode, _csr, _write_pair, call, heartbeat, nodes

# The same explorer as test_trust's (and the fleet of tests/conftest.py).
explorer = test_trust.explorer

#: The explorer's tables that hold who may speak for which id (those that exist: a
#: test run against an older explorer reads what it has).
TRUST_TABLES = (
    "identities",
    "revoked_serials",
    "revoked_secrets",
    "revoked_ids",
    "issued_serials",
    "tokens",
)


def trust_state(explorer):
    """Every row of the explorer's trust tables, read from its state file."""
    path = os.path.join(explorer.env["EXPLORER_STATE_DIR"], "explorer.db")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        present = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        return {
            table: sorted(db.execute(f"SELECT * FROM {table}"))
            for table in TRUST_TABLES
            if table in present
        }
    finally:
        db.close()


def registry(explorer):
    """The registry as the operator sees it, without what every heartbeat changes."""
    return {
        node_id: (n["socket_path"], n["transport"], n["name"], n["first_seen"])
        for node_id, n in nodes(explorer).items()
    }


def code(response):
    """The error code of a response, or None for a result."""
    return response.get("error", {}).get("code")


def start_node(twistd, short_tmp, node_id, explorer_uri, **env):
    """A real node heartbeating to ``explorer_uri`` every 0.3 s."""
    return twistd(
        ["node", "--socket", f"{short_tmp}/{node_id}.sock"],
        env={
            "HERO_STATE_DIR": f"{short_tmp}/{node_id}",
            "EXPLORER_ADDRESSES": explorer_uri,
            "NODE_ID": node_id,
            "HEARTBEAT_INTERVAL": "0.3",
            **env,
        },
    )


def online(explorer, node_id):
    """Wait until the node is online; its record."""
    return wait_for(
        lambda: (
            nodes(explorer).get(node_id, {}).get("status") == "online"
            and nodes(explorer)[node_id]
        ),
        what=f"{node_id} online",
    )


def keeps_heartbeating(explorer, node_id):
    """The real node's heartbeats are still accepted after the attack."""
    since = time.time()
    wait_for(
        lambda: nodes(explorer)[node_id]["last_seen"] > since + 0.5,
        what=f"{node_id} heartbeating on",
    )
    assert nodes(explorer)[node_id]["status"] == "online"


def generic_token(explorer):
    """A join token naming no node, as an attacker may hold one."""
    return result(explorer.unix, "explorer.create_token", {})["token"]


def generic_enroll(fleet, explorer, node_id, token=None):
    """The attack: a token naming no node, spent on ``node_id`` over TLS."""
    _, csr = _csr(node_id)
    token = token or generic_token(explorer)
    return call(fleet, explorer, None, "explorer.enroll", {"token": token, "csr": csr})


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_generic_token_cannot_take_a_live_node(
    fleet, explorer, twistd, short_tmp, transport
):
    """A generic token is refused (-32010) for the id of a live secret-bound node (plain
    TCP or Unix); the node keeps heartbeating, nothing else changes."""
    node_id = f"victim-{transport}"
    extra = {"NODE_TCP_ADDR": "127.0.0.1:0"} if transport == "tcp" else {}
    start_node(twistd, short_tmp, node_id, getattr(explorer, transport), **extra)
    assert online(explorer, node_id)["transport"] == transport
    token = generic_token(explorer)
    reg, state = registry(explorer), trust_state(explorer)
    answer = generic_enroll(fleet, explorer, node_id, token)
    assert code(answer) == -32010, answer
    assert "certificate" not in answer.get("result", {})
    keeps_heartbeating(explorer, node_id)
    assert registry(explorer) == reg
    assert trust_state(explorer) == state
    # The node's calls still reach the node itself.
    info = result(
        explorer.unix, "explorer.call", {"node_id": node_id, "method": "node.info"}
    )
    assert info["node_id"] == node_id


def test_generic_token_cannot_take_a_forgotten_but_known_id(
    fleet, twistd, short_tmp, tmp_path
):
    """After NODE_FORGET_AFTER drops a node's record, its id stays bound to its secret:
    a generic token is refused for it, and the node, back, is accepted as itself."""
    explorer = start_tls_explorer(
        twistd, short_tmp, fleet, NODE_OFFLINE_AFTER="1", NODE_FORGET_AFTER="1"
    )
    node_env = {"NODE_TCP_ADDR": "127.0.0.1:0"}
    node = start_node(twistd, short_tmp, "gone", explorer.tcp, **node_env)
    online(explorer, "gone")
    node.stop()
    wait_for(lambda: "gone" not in nodes(explorer), timeout=15, what="gone forgotten")
    token = generic_token(explorer)
    state = trust_state(explorer)
    answer = generic_enroll(fleet, explorer, "gone", token)
    assert code(answer) == -32010, answer
    assert nodes(explorer) == {}
    assert trust_state(explorer) == state
    start_node(twistd, short_tmp, "gone", explorer.tcp, **node_env)
    assert online(explorer, "gone")["transport"] == "tcp"


def test_generic_token_still_enrolls_a_new_id(fleet, explorer):
    """A generic token enrolls an id the explorer has never heard of."""
    answer = generic_enroll(fleet, explorer, "brand-new")
    assert "certificate" in answer["result"], answer


def enroll_for(fleet, explorer, node_id, tmp_path, name):
    """Enroll ``node_id`` with a token made for it; its (cert, key) paths, as ``name``."""
    token = result(explorer.unix, "explorer.create_token", {"node_id": node_id})
    key, csr = _csr(node_id)
    answer = call(
        fleet, explorer, None, "explorer.enroll", {"token": token["token"], "csr": csr}
    )
    fleet[name] = _write_pair(tmp_path, name, answer["result"]["certificate"], key)
    return fleet[name]


def renew_as(fleet, explorer, who, node_id, tmp_path, name):
    """Renew the certificate ``who`` holds; the new one stored as ``name``."""
    key, csr = _csr(node_id)
    answer = call(fleet, explorer, who, "explorer.renew", {"csr": csr})
    fleet[name] = _write_pair(tmp_path, name, answer["result"]["certificate"], key)
    return answer


def proxied_call_to(fleet, explorer, node_id, current, impostor_key):
    """
    Serve ``impostor_key``'s certificate at the node's advertised address (the node's
    ``current`` certificate heartbeats it there), and proxy a call to the node.

    :return: the caller's answer, and the bytes the impostor received
    """
    impostor = SilentTLSNode(*fleet[impostor_key], fleet["ca"])
    try:
        beat = call(
            fleet,
            explorer,
            current,
            "explorer.heartbeat",
            heartbeat(node_id, f"tls://127.0.0.1:{impostor.port}"),
        )
        assert beat["result"]["accepted"], beat
        reg, state = registry(explorer), trust_state(explorer)
        answer = rpc(
            explorer.unix,
            "explorer.call",
            {"node_id": node_id, "method": "vm.create", "params": {"name": "secret-vm"}},
        )
        wait_for(impostor.all_ended, what="the explorer's connections to it ended")
        assert registry(explorer) == reg and trust_state(explorer) == state
        return answer, impostor.received
    finally:
        impostor.close()


def test_proxy_refuses_a_revoked_key_at_the_node_address(fleet, explorer, tmp_path):
    """A revoked node key serving at the node's address gets zero bytes of a proxied
    call; the caller gets -32003."""
    enroll_for(fleet, explorer, "prox", tmp_path, "prox-1")
    assert result(explorer.unix, "explorer.revoke", {"node_id": "prox"}) is True
    enroll_for(fleet, explorer, "prox", tmp_path, "prox-2")
    answer, received = proxied_call_to(fleet, explorer, "prox", "prox-2", "prox-1")
    assert received == b""
    assert code(answer) == -32003, answer


def test_proxy_refuses_a_superseded_certificate(fleet, explorer, tmp_path):
    """A certificate superseded by renewal, then one superseded by re-enrollment, gets
    zero bytes of a proxied call at the node's address; the caller gets -32003."""
    enroll_for(fleet, explorer, "sup", tmp_path, "sup-1")
    renew_as(fleet, explorer, "sup-1", "sup", tmp_path, "sup-2")
    answer, received = proxied_call_to(fleet, explorer, "sup", "sup-2", "sup-1")
    assert received == b"" and code(answer) == -32003, answer
    enroll_for(fleet, explorer, "sup", tmp_path, "sup-3")
    answer, received = proxied_call_to(fleet, explorer, "sup", "sup-3", "sup-2")
    assert received == b"" and code(answer) == -32003, answer


def test_revocation_survives_reenrollment_and_removal(fleet, explorer, tmp_path):
    """Revoke an id whose certificate was made offline, re-enroll it with a token for
    it, remove it: the old certificate stays refused at heartbeat, renew and the
    proxy, and the newly enrolled node keeps working."""
    ca_dir = os.path.dirname(fleet["ca"])
    fleet["undo-old"] = pki.create_cert(
        ca_dir, "node", "undo", out=str(tmp_path / "undo-old")
    )
    beat = heartbeat("undo", "tls://127.0.0.1:9")
    assert "result" in call(fleet, explorer, "undo-old", "explorer.heartbeat", beat)
    assert result(explorer.unix, "explorer.revoke", {"node_id": "undo"}) is True
    enroll_for(fleet, explorer, "undo", tmp_path, "undo-new")
    assert "result" in call(fleet, explorer, "undo-new", "explorer.heartbeat", beat)
    assert result(explorer.unix, "explorer.remove_node", {"node_id": "undo"}) is True

    state = trust_state(explorer)
    assert code(call(fleet, explorer, "undo-old", "explorer.heartbeat", beat)) == -32010
    _, csr = _csr("undo")
    assert code(call(fleet, explorer, "undo-old", "explorer.renew", {"csr": csr})) == -32010
    assert "undo" not in nodes(explorer)
    assert trust_state(explorer) == state

    answer, received = proxied_call_to(fleet, explorer, "undo", "undo-new", "undo-old")
    assert received == b"" and code(answer) == -32003, answer
    renewed = renew_as(fleet, explorer, "undo-new", "undo", tmp_path, "undo-renewed")
    assert "certificate" in renewed["result"]
    assert "result" in call(fleet, explorer, "undo-renewed", "explorer.heartbeat", beat)
    assert code(call(fleet, explorer, "undo-old", "explorer.heartbeat", beat)) == -32010


def test_renew_without_a_certificate_is_refused_not_an_error(fleet, explorer):
    """explorer.renew over plain TCP or the Unix socket is -32010, not -32603, and no
    traceback is logged."""
    _, csr = _csr("nobody")
    for uri in (explorer.tcp, explorer.unix):
        answer = rpc(uri, "explorer.renew", {"csr": csr})
        assert code(answer) == -32010, (uri, answer)
    assert "Traceback" not in explorer.output


def test_enroll_is_refused_over_plain_tcp(fleet, explorer):
    """explorer.enroll over plain TCP is refused and the token stays unused; over the
    Unix socket and TLS without a certificate it is allowed."""
    token = result(explorer.unix, "explorer.create_token", {"node_id": "clear"})["token"]
    _, csr = _csr("clear")
    state = trust_state(explorer)
    answer = rpc(explorer.tcp, "explorer.enroll", {"token": token, "csr": csr})
    assert code(answer) == -32010, answer
    assert trust_state(explorer) == state
    answer = call(fleet, explorer, None, "explorer.enroll", {"token": token, "csr": csr})
    assert "certificate" in answer["result"], answer
    token = result(explorer.unix, "explorer.create_token", {"node_id": "local"})["token"]
    _, csr = _csr("local")
    answer = rpc(explorer.unix, "explorer.enroll", {"token": token, "csr": csr})
    assert "certificate" in answer["result"], answer


class AnsweringTLSNode(SilentTLSNode):
    """A TLS server holding some node's certificate that answers every JSON-RPC call
    with an empty list, on kept-alive connections, and records every byte it gets."""

    def _serve(self):
        while conn := self._accept():
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(10)
                pending = b""
                while data := tls.recv(65536):
                    self.received += data
                    pending += data
                    while b"\r\n\r\n" in pending:
                        head, rest = pending.split(b"\r\n\r\n", 1)
                        length = int(
                            re.search(rb"(?i)content-length: *(\d+)", head).group(1)
                        )
                        if len(rest) < length:
                            break
                        body, pending = rest[:length], rest[length:]
                        rid = json.loads(body)["id"]
                        reply = json.dumps({"jsonrpc": "2.0", "id": rid, "result": []})
                        tls.sendall(
                            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply.encode())
                        )
        except (OSError, ssl.SSLError):
            pass
        finally:
            self._end()


def test_kept_connection_to_a_superseded_certificate_gets_nothing(
    fleet, explorer, tmp_path
):
    """A connection the proxy keeps from before a re-enrollment is not reused: the
    peer holding the old certificate gets no byte of the next call (-32003)."""
    enroll_for(fleet, explorer, "kept", tmp_path, "kept-1")
    holder = AnsweringTLSNode(*fleet["kept-1"], fleet["ca"])
    try:
        beat = heartbeat("kept", f"tls://127.0.0.1:{holder.port}")
        assert "result" in call(fleet, explorer, "kept-1", "explorer.heartbeat", beat)
        call_vm_list = {"node_id": "kept", "method": "vm.list"}
        # While kept-1 is the node's certificate, its holder is the node.
        assert result(explorer.unix, "explorer.call", call_vm_list) == []
        enroll_for(fleet, explorer, "kept", tmp_path, "kept-2")
        assert "result" in call(fleet, explorer, "kept-2", "explorer.heartbeat", beat)
        before = len(holder.received)
        answer = rpc(explorer.unix, "explorer.call", call_vm_list)
        wait_for(holder.all_ended, what="the explorer's connections to it ended")
        assert code(answer) == -32003, answer
        assert len(holder.received) == before
    finally:
        holder.close()
